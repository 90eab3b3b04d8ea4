#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), for `run(carry=[".whl"])`.
#
#   bash benchmarks/prepare_gpu_wheels.sh          # bitsandbytes 0.50.2, slimmed (CUDA 13.x + CPU libs only)
#   bash benchmarks/prepare_gpu_wheels.sh --full   # keep the wheel as published (43 MB)
#
# The device image (python 3.12, torch 2.11+cu130) has peft, transformers, pytest-timeout,
# pytest-xdist, but no bitsandbytes; it cannot reach any registry.  bitsandbytes picks
# libbitsandbytes_cuda<torch.version.cuda>.so, i.e. cuda130 there, so --slim drops the other
# CUDA/ROCm/XPU builds (129 MB unpacked -> ~12 MB) and the working tree + carry stays far
# under the device tool's 64 MiB.  The slim wheel is a repacked copy for transport only.
set -euo pipefail
cd "$(dirname "$0")/.."
SLIM=1
[ "${1:-}" = "--full" ] && SLIM=0
BNB_VERSION=${BNB_VERSION:-0.50.2}
mkdir -p .whl
grep -qx '/.whl/' .gitignore 2>/dev/null || echo "note: add /.whl/ to .gitignore (it is in the repo's .gitignore already if this prints nothing)"
rm -f .whl/bitsandbytes-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "bitsandbytes==${BNB_VERSION}"
WHL=$(ls .whl/bitsandbytes-"${BNB_VERSION}"-*.whl)
echo "downloaded: $WHL ($(du -h "$WHL" | cut -f1))"
if [ "$SLIM" = 1 ]; then
  python3 - "$WHL" <<'EOF'
import base64, hashlib, os, re, sys, zipfile
src = sys.argv[1]
tmp = src + ".tmp"
# keep the CPU library and the CUDA 13.x builds (torch 2.11+cu130 on the device)
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    kept, lines = [], []
    for info in zin.infolist():
        if drop.search(info.filename) or info.filename == record_name:
            continue
        data = zin.read(info.filename)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(lines) + "\n")
os.replace(tmp, src)
EOF
  echo "slimmed:    $WHL ($(du -h "$WHL" | cut -f1)); kept: $(unzip -l "$WHL" | grep -o 'libbitsandbytes_[a-z0-9]*\.so' | tr '\n' ' ')"
fi
echo ".whl total: $(du -sh .whl | cut -f1); working tree (without .git): $(du -sh --exclude=.git --exclude=.whl . | cut -f1)"
echo "carry it: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
