"""GPU validation of the CUDA backend (mamba-ssm Triton kernels) against the PyTorch reference.

Every test here is marked `gpu` and is skipped, with the reason, unless a CUDA device is present and the
mamba-ssm kernels load (`m1_plugins.ops.load_kernels()`). Run them on the GPU machine with
`scripts/gpu_run.sh` (mamba-ssm as a source tree on PYTHONPATH, see `scripts/gpu_prepare.sh`).

Environment:
  M1_GPU_TESTS_ON_CPU=1   dry run of this test code on the CPU: device "cpu", and the "cuda" backend replaced
                          by "reference" (the comparisons are then trivial; it checks the test code itself).
  M1_TRITON_CONFIGS=all   autotune every mamba-ssm kernel config as in production. The default, "one", keeps
                          the config with the smallest tiles of each autotuned kernel: every config computes
                          the same function (they only change tile sizes, warps and pipeline stages), and
                          compiling all ~10 configs of ~15 kernels for every dtype/shape specialisation that
                          these tests hit would take far longer than the GPU session allows. The benchmark
                          (benchmarks/train_throughput.py) runs the fully autotuned kernels.
  M1_GPU_REPORT=path      append one JSON line per checked tensor (errors, bounds) to this file.
"""

import json
import os

import pytest
import torch

ON_CPU = os.environ.get("M1_GPU_TESTS_ON_CPU") == "1"
_STATUS = None


def kernels_status():
    """(usable, reason), evaluated once per process."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _probe()
    return _STATUS


def _probe():
    if ON_CPU:
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device: torch.cuda.is_available() is False (these tests run on the GPU machine)"
    try:
        from m1_plugins.ops import load_kernels

        kernels = load_kernels()
    except Exception as err:  # a broken mamba-ssm install must read as a skip reason, not a collection error
        return False, f"loading the mamba-ssm kernels raised {err!r}"
    if kernels is None:
        return False, ("the mamba-ssm Triton kernels cannot be loaded: put a mamba-ssm 2.3.2.post1 source tree on "
                       "PYTHONPATH (scripts/gpu_prepare.sh builds .device/site)")
    if os.environ.get("M1_TRITON_CONFIGS", "one") != "all":
        limit_autotune_to_one_config()
    return True, ""


def _tile_cost(config):
    tiles = 1
    for value in config.kwargs.values():
        if isinstance(value, int):
            tiles *= value
    return (tiles, config.num_stages or 0, config.num_warps or 0)


def limit_autotune_to_one_config():
    from m1_plugins.ops._kernels import mamba_autotuners

    for tuner in mamba_autotuners():
        if len(tuner.configs) > 1:
            tuner.configs = [min(tuner.configs, key=_tile_cost)]


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    usable, reason = kernels_status()
    if not usable:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cpu" if ON_CPU else "cuda")


@pytest.fixture
def kernel_backend():
    """The backend under test: "cuda" (or "reference" in the CPU dry run)."""
    return "reference" if ON_CPU else "cuda"


@pytest.fixture
def record(request):
    """record(name, **numbers): one JSON line per checked tensor into $M1_GPU_REPORT (if set)."""
    path = os.environ.get("M1_GPU_REPORT")

    def write(name, **numbers):
        if not path:
            return
        line = json.dumps({"test": request.node.nodeid.split("::", 1)[-1], "tensor": name, **numbers})
        with open(path, "a") as f:  # one short write per line: safe with several pytest-xdist workers
            f.write(line + "\n")

    return write
