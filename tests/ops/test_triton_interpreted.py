"""Our inference kernels (the decode step's conv-state update, the row-tiled gated RMSNorm) against their PyTorch
references, on CPU through Triton's interpreter (TRITON_INTERPRET=1): their indexing, masking and in-place writes
are checked in CI, not only on the GPU machine (tests/gpu/test_kernels_gpu.py repeats the comparisons with the
compiled kernels in bf16 and fp32). The paged-attention kernel cannot run there: its loop bounds are loaded from
memory, which Triton 3.6's interpreter refuses.

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
    from m1_plugins.ops._gated_norm_triton import rmsnorm_gated_rows
    from m1_plugins.ops._state_update_triton import state_update
    from m1_plugins.ops.conv import causal_conv1d_update_ref
    from m1_plugins.ops.norm import rmsnorm_gated_ref
    from m1_plugins.ops.ssd import ssd_step_ref

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

    # gated norm: the paper's 16-channel groups, head-sized groups, one group of a width that is no power of two;
    # z a strided view of a wider projection (the in_proj split), rows in two leading dimensions
    for group_size, dim in ((16, 96), (32, 96), (None, 80)):
        x, zz, w = torch.randn(2, 5, dim), torch.randn(2, 5, dim + 24), 1 + 0.1 * torch.randn(dim)
        for z in (zz[..., 7:7 + dim], None):
            got = rmsnorm_gated_rows(x, w, z, 1e-5, group_size)
            expected = rmsnorm_gated_ref(x, w, z=z, eps=1e-5, group_size=group_size)
            errors[f"norm groups of {group_size}{' gated' if z is not None else ''}"] = (got - expected).abs().max().item()

    # state update: M1's heads (one group per head, 16 x 16) and grouped B/C with smaller heads, a head count that
    # leaves the last program's block partly empty; x, B, C strided views of one row (as the mixer splits it), the
    # state the first rows of the slots; with D and dt_bias (softplus), and without (dt already discretised)
    relative = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()  # noqa: E731
    for nheads, headdim, dstate, ngroups in ((20, 16, 16, 20), (24, 8, 16, 6)):
        for full in (True, False):
            width = nheads * headdim + 2 * ngroups * dstate
            A = -torch.rand(nheads) * 4
            D, dt_bias = (torch.randn(nheads), torch.randn(nheads)) if full else (None, None)
            slots = torch.randn(batch + 2, nheads, headdim, dstate)
            ref_state, state = slots[:batch].clone(), slots.clone()
            key = f"state update {nheads}x{headdim}x{dstate} groups {ngroups}{' D softplus' if full else ''}"
            for _ in range(3):
                row = torch.randn(batch, width + 5)[:, 5:]
                x, B, C = row.split([nheads * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
                x, B, C = x.view(batch, nheads, headdim), B.view(batch, ngroups, dstate), C.view(batch, ngroups, dstate)
                dt = torch.randn(batch, nheads) if full else torch.rand(batch, nheads)
                expected = ssd_step_ref(ref_state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=full)
                got = state_update(state[:batch], x, dt, A, B, C, D, dt_bias, full)
                errors[key] = max(errors.get(key, 0.0), relative(got, expected), relative(state[:batch], ref_state))
            errors[key + " other slots untouched"] = (state[batch:] - slots[batch:]).abs().max().item()

    # the custom ops' declarations (schema, mutated arguments, fake outputs) agree with what the kernels do, as
    # torch.compile relies on them in the engine's decode graph; opcheck raises otherwise
    x_view, state_view = torch.randn(3, 40)[:, :32], torch.randn(5, 32, 3)[:3]  # strided, as in the decode step
    torch.library.opcheck(conv_state_update, (x_view, state_view, torch.randn(32, 4), torch.randn(32), True))
    z_view = torch.randn(2, 5, 120)[..., :96]
    torch.library.opcheck(rmsnorm_gated_rows, (torch.randn(2, 5, 96), torch.randn(96), z_view, 1e-5, 16))
    row = torch.randn(3, 4 * 16 + 2 * 4 * 16 + 8)[:, 8:]
    x_view, B_view, C_view = (t.reshape(3, 4, 16) for t in row.split([64, 64, 64], dim=-1))
    torch.library.opcheck(state_update, (torch.randn(5, 4, 16, 16)[:3], x_view, torch.randn(3, 4), -torch.rand(4),
                                         B_view, C_view, torch.randn(4), torch.randn(4), True))

    return errors


def test_inference_kernels_match_the_references_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    # conv: 3 widths x (bias + silu, neither) x (outputs and state, the other slots); norm: 3 shapes x (gated, not);
    # state update: 2 layouts x (D + softplus, neither) x (outputs and state, the other slots)
    assert len(errors) == 26
    # fp32 throughout; the kernels accumulate in another order than the references: a few ulps, not bit equality
    # (state update: relative to the largest value, which grows to ~20 over the steps)
    assert all(e < 1e-5 for e in errors.values()), errors


if __name__ == "__main__":
    print(json.dumps(interpreted_errors()))
