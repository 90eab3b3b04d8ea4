"""CPU dequantize 4096x14336 (double quant -> bf16): nf4kit vs bitsandbytes, through the public
API (fresh 117 MB output each call) and into a preallocated buffer, beside fill_/copy_ ceilings.
Interleaved min/median of 15.  `python benchmarks/cpu_dequant_check.py` (a measurement, not a test).
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import torch, time, nf4kit, statistics
from benchmarks import anchors
F = anchors.bitsandbytes().functional  # stock bitsandbytes, as every benchmark anchor
torch.manual_seed(0)
Wb = torch.randn(4096, 14336).bfloat16()
pb, qb = nf4kit.quantize_4bit(Wb, compress_statistics=True)
q2, s2 = F.quantize_4bit(Wb, compress_statistics=True, quant_type="nf4")
out = torch.empty(4096*14336, dtype=torch.bfloat16)
fs = {"nf4kit": lambda: nf4kit.dequantize_4bit(pb, qb), "bnb": lambda: F.dequantize_4bit(q2, s2),
      "empty+fill_": lambda: torch.empty(4096*14336, dtype=torch.bfloat16).fill_(1.0),
      "warm fill_": lambda: out.fill_(1.0)}
for f in fs.values():
    for _ in range(3): f()
res = {k: [] for k in fs}
for _ in range(15):
    for k, f in fs.items():
        t0 = time.perf_counter(); r = f(); del r; res[k].append(time.perf_counter() - t0)
for k, v in res.items():
    print(f"{k:12s} min {min(v)*1e3:6.2f} ms  median {statistics.median(v)*1e3:6.2f} ms")
from nf4kit.backends._native import load, ptr, DTYPE_CODES
from nf4kit import ops
C = load()
sa = ops.state_args(qb); flat = pb.reshape(-1)
off = sa[3].reshape(1)
def ours_warm():
    C.cpu.dequantize_4bit(ptr(flat), 0, ptr(sa[0]), ptr(sa[1]), ptr(sa[2]), ptr(off), 4096*14336, 64, 0, ptr(out), 2)
out2 = torch.empty((4096, 14336), dtype=torch.bfloat16)
def bnb_warm(): F.dequantize_4bit(q2, s2, out=out2)
g = {"nf4kit warm": ours_warm}
try:  # stock bitsandbytes 0.50.2 has no CPU kernel for dequantize_4bit.out
    bnb_warm()
    g["bnb warm(out=)"] = bnb_warm
except NotImplementedError as e:
    print("bnb warm(out=): n/a,", str(e).splitlines()[0][:100])
for f in g.values():
    for _ in range(3): f()
res = {k: [] for k in g}
for _ in range(15):
    for k, f in g.items():
        t0 = time.perf_counter(); f(); res[k].append(time.perf_counter() - t0)
for k, v in res.items():
    print(f"{k:14s} min {min(v)*1e3:6.2f} ms  median {statistics.median(v)*1e3:6.2f} ms  {(pb.numel()+out.numel()*2)/min(v)/1e9:.1f} GB/s")
src = torch.empty(146*2**20, dtype=torch.uint8); dst = torch.empty_like(src)
c=[]
for _ in range(10):
    t0=time.perf_counter(); dst.copy_(src); c.append(time.perf_counter()-t0)
print("copy_ 146MiB: %.1f GB/s" % (2*src.numel()/min(c)/1e9))
