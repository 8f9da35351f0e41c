"""The decode step's conv-state kernel against its PyTorch reference, on CPU through Triton's interpreter
(TRITON_INTERPRET=1): its indexing, masking and in-place writes are checked in CI, not only on the GPU machine
(tests/gpu/test_kernels_gpu.py repeats the comparison with the compiled kernel in bf16 and fp32). The paged-attention
kernel cannot run there: its loop bounds are loaded from memory, which Triton 3.6's interpreter refuses.

The interpreter is chosen when a kernel is defined, so the checks run in a fresh process (this file as a script),
which prints the largest errors as JSON.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def interpreted_errors() -> dict:
    from m1_plugins.ops._conv_update_triton import conv_state_update
    from m1_plugins.ops.conv import causal_conv1d_update_ref

    torch.manual_seed(0)
    errors = {}
    batch, dim = 3, 300  # a channel block (256) that the last program fills only partly
    for width in (2, 3, 4):
        for bias, silu in ((True, True), (False, False)):
            wide = torch.randn(batch, dim + 40)  # x as a strided view of a wider projection, as in the model
            x = wide[:, 17:17 + dim]
            slots = torch.randn(batch + 2, dim, width - 1)  # the decode step's state: the first rows of the slots
            weight, b = torch.randn(dim, width), torch.randn(dim) if bias else None
            ref_state, state = slots[:batch].clone(), slots.clone()
            for _ in range(width + 1):  # past the window: every column has been shifted through
                expected = causal_conv1d_update_ref(x, ref_state, weight, b, "silu" if silu else None)
                got = conv_state_update(x, state[:batch], weight, b, silu)
                key = f"conv width {width}{' bias silu' if bias else ''}"
                errors[key] = max(errors.get(key, 0.0), (got - expected).abs().max().item(),
                                  (state[:batch] - ref_state).abs().max().item())
                x = torch.randn(batch, dim)
            errors[key + " other slots untouched"] = (state[batch:] - slots[batch:]).abs().max().item()

    return errors


def test_conv_state_kernel_matches_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 12  # 3 widths x (bias + silu, neither) x (outputs and state, the other slots)
    # fp32 throughout; the kernel accumulates in another order than the reference: a few ulps, not bit equality
    assert all(e < 1e-5 for e in errors.values()), errors


if __name__ == "__main__":
    print(json.dumps(interpreted_errors()))
