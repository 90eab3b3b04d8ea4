"""Shared fixtures.  The suite is parametrised over the (backend, device) pairs usable on
this machine: on a CPU-only machine that is cpu/torch on CPU tensors and triton under the
interpreter; on a GPU machine cuda/triton/torch on CUDA tensors as well."""
from __future__ import annotations

import os

import torch

# Triton's interpreter must be chosen before triton is imported (DESIGN.md §6).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# bitsandbytes is an oracle in these tests: keep nf4kit's entry point from replacing its
# kernels at import (tests/integrations enable it explicitly).
os.environ.setdefault("NF4KIT_BNB_BACKEND", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

import nf4kit  # noqa: E402
from nf4kit import backends  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def backend_device_pairs() -> list[tuple[str, str]]:
    pairs = []
    avail = backends.available_backends()
    for b in avail:
        mod = backends.get(b)
        for dev in (["cuda"] if HAS_CUDA else []) + ["cpu"]:
            if mod.serves(torch.device(dev)):
                pairs.append((b, dev))
    return pairs


PAIRS = backend_device_pairs()


@pytest.fixture(params=PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def backend_device(request):
    """(backend name, device) with that backend forced first for the test's duration."""
    b, d = request.param
    with nf4kit.use_backend(b):
        yield b, d


@pytest.fixture
def golden():
    return torch.load(DATA / "golden_nf4.pt", weights_only=True)


@pytest.fixture
def one_thread():
    """One intra-op thread for small shapes: no OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_ran(op: str, backend: str) -> None:
    """The last call of `op` was served by `backend` (no silent fallback)."""
    assert backends.last_backend.get(op) == backend, f"{op} ran on {backends.last_backend.get(op)}, not {backend}"


def slow_backend(b: str, d: str) -> bool:
    """The Triton interpreter runs kernels in Python: keep its shapes small."""
    return b == "triton" and d == "cpu"


# NF4KIT_COLLECTED_FILE (set by benchmarks/gpu_check.sh): how many tests were collected, so that a
# report can say how many a run cut at its time limit did not reach (junit XML counts only those run).
def _write_collected(n: int) -> None:
    path = os.environ.get("NF4KIT_COLLECTED_FILE")
    if path and n > 0:
        pathlib.Path(path).write_text(f"{n}\n")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):  # the xdist controller: each worker's collection
    _write_collected(len(ids))


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):  # a run without xdist (workers report above)
        _write_collected(len(session.items))
