"""Boundary-aware causal depthwise conv, its single-step twin, the gated RMSNorm, and backend resolution."""

import pytest
import torch
import torch.nn.functional as F

from m1_plugins.ops import (
    BACKENDS, causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref, resolve_backend,
    rmsnorm_gated, rmsnorm_gated_ref,
)

BATCH, DIM, WIDTH = 2, 6, 4


def conv_inputs(seqlen, dtype=torch.float64, width=WIDTH):
    g = torch.Generator().manual_seed(seqlen + 100 * width)
    return (torch.randn(BATCH, DIM, seqlen, generator=g, dtype=dtype),
            torch.randn(DIM, width, generator=g, dtype=dtype),
            torch.randn(DIM, generator=g, dtype=dtype))


def torch_causal_conv(x, weight, bias, activation):
    width = weight.shape[1]
    y = F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_equals_torch_conv1d(activation, with_bias, width):
    x, w, b = conv_inputs(11, width=width)
    b = b if with_bias else None
    y = causal_conv1d_ref(x, w, b, activation=activation)
    torch.testing.assert_close(y, torch_causal_conv(x, w, b, activation), rtol=1e-12, atol=1e-12)
    assert torch.equal(causal_conv1d(x, w, b, activation=activation, backend="reference"), y)


def test_conv_rejects_unknown_activation():
    x, w, b = conv_inputs(5)
    with pytest.raises(ValueError, match="gelu"):
        causal_conv1d_ref(x, w, b, activation="gelu")


@pytest.mark.parametrize("lengths", [[1, 2, 3, 10], [4, 4, 8], [16]])
def test_conv_with_seq_idx_equals_separate_documents(lengths):
    x, w, b = conv_inputs(sum(lengths))
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].expand(BATCH, -1)
    y = causal_conv1d_ref(x, w, b, seq_idx=seq_idx)
    y_sep = torch.cat([torch_causal_conv(xd, w, b, "silu") for xd in x.split(lengths, dim=-1)], dim=-1)
    torch.testing.assert_close(y, y_sep, rtol=1e-12, atol=1e-12)
    if len(lengths) > 1:  # and the boundaries matter
        assert (y - torch_causal_conv(x, w, b, "silu")).abs().max() > 1e-3


def test_conv_seq_idx_differs_per_row():
    x, w, b = conv_inputs(9)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    y = causal_conv1d_ref(x, w, b, seq_idx=seq_idx)
    for row, cuts in ((0, [3, 6]), (1, [1, 5, 3])):
        expected = torch.cat([torch_causal_conv(xd, w, b, "silu") for xd in x[row : row + 1].split(cuts, dim=-1)], -1)
        torch.testing.assert_close(y[row : row + 1], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_conv_initial_states_continue_a_sequence(split):
    x, w, b = conv_inputs(12)
    full = causal_conv1d_ref(x, w, b)
    head = x[..., :split]
    state = F.pad(head, (max(0, WIDTH - 1 - split), 0))[..., -(WIDTH - 1):]  # last width-1 inputs, zero-filled
    tail = causal_conv1d_ref(x[..., split:], w, b, initial_states=state)
    torch.testing.assert_close(tail, full[..., split:], rtol=1e-12, atol=1e-12)


def test_conv_initial_states_with_seq_idx():
    """The initial state belongs to the first document of the continuation; later documents start clean."""
    x, w, b = conv_inputs(14)
    split = 5
    # the whole row: document 0 = tokens 0..8, document 1 = tokens 9..13
    seq_full = torch.tensor([0] * 9 + [1] * 5)[None].expand(BATCH, -1)
    full = causal_conv1d_ref(x, w, b, seq_idx=seq_full)
    state = x[..., split - (WIDTH - 1) : split]
    tail = causal_conv1d_ref(x[..., split:], w, b, seq_idx=seq_full[:, split:], initial_states=state)
    torch.testing.assert_close(tail, full[..., split:], rtol=1e-12, atol=1e-12)
    # also when the continuation's seq_idx do not start at 0
    tail3 = causal_conv1d_ref(x[..., split:], w, b, seq_idx=seq_full[:, split:] + 3, initial_states=state)
    torch.testing.assert_close(tail3, full[..., split:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_update_step_by_step_equals_full(dtype):
    x, w, b = conv_inputs(10, dtype=dtype)
    full = causal_conv1d_ref(x, w, b)
    state = torch.zeros(BATCH, DIM, WIDTH - 1, dtype=dtype)
    steps = [causal_conv1d_update_ref(x[..., t], state, w, b) for t in range(x.shape[-1])]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(torch.stack(steps, dim=-1), full, rtol=tol, atol=tol)
    assert torch.equal(state, x[..., -(WIDTH - 1):])  # the state holds the last width-1 inputs, oldest first
    # the dispatcher with the reference backend does the same
    state2 = torch.zeros_like(state)
    y0 = causal_conv1d_update(x[..., 0], state2, w, b, backend="reference")
    torch.testing.assert_close(y0, full[..., 0], rtol=tol, atol=tol)


def test_conv_update_after_prefill_with_initial_states():
    """Prefill from a state, then steps: the same as running the whole sequence."""
    x, w, b = conv_inputs(9)
    full = causal_conv1d_ref(x, w, b, activation=None)
    state = x[..., 2:5].clone()
    ys = [causal_conv1d_ref(x[..., 5:6], w, b, initial_states=state, activation=None)[..., 0]]
    state = x[..., 3:6].clone()
    ys += [causal_conv1d_update_ref(x[..., t], state, w, b, activation=None) for t in range(6, 9)]
    torch.testing.assert_close(torch.stack(ys, -1), full[..., 5:], rtol=1e-12, atol=1e-12)


# --- gated RMSNorm ------------------------------------------------------------------------------------

def norm_inputs(dim=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(dim)
    return (torch.randn(3, 5, dim, generator=g, dtype=dtype), torch.randn(dim, generator=g, dtype=dtype),
            torch.randn(3, 5, dim, generator=g, dtype=dtype))


@pytest.mark.parametrize("group_size", [None, 12, 4, 3])
@pytest.mark.parametrize("with_gate", [True, False])
def test_rmsnorm_gated_formula(group_size, with_gate):
    x, w, z = norm_inputs()
    z = z if with_gate else None
    eps = 1e-5
    y = rmsnorm_gated_ref(x, w, z=z, eps=eps, group_size=group_size)
    gs = group_size or 12
    expected = torch.empty_like(x)
    for b in range(3):
        for t in range(5):
            for g0 in range(0, 12, gs):
                v = x[b, t, g0 : g0 + gs] * (z[b, t, g0 : g0 + gs] * torch.sigmoid(z[b, t, g0 : g0 + gs]) if with_gate else 1)
                expected[b, t, g0 : g0 + gs] = v / torch.sqrt((v * v).sum() / gs + eps) * w[g0 : g0 + gs]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(rmsnorm_gated(x, w, z=z, eps=eps, group_size=group_size, backend="reference"), y)


def test_rmsnorm_grouped_equals_loop_over_groups():
    x, w, z = norm_inputs(16)
    y = rmsnorm_gated_ref(x, w, z=z, group_size=4)
    loop = torch.cat([rmsnorm_gated_ref(x[..., i : i + 4], w[i : i + 4], z=z[..., i : i + 4]) for i in range(0, 16, 4)], -1)
    torch.testing.assert_close(y, loop, rtol=1e-12, atol=1e-12)
    # grouping matters
    assert (y - rmsnorm_gated_ref(x, w, z=z)).abs().max() > 1e-3


def test_rmsnorm_gate_before_norm():
    """The gate is applied before the norm: norm(x * silu(z)), not norm(x) * silu(z)."""
    x, w, z = norm_inputs()
    y = rmsnorm_gated_ref(x, w, z=z)
    gate_after = rmsnorm_gated_ref(x, w) * F.silu(z)
    assert (y - gate_after).abs().max() > 1e-2


def test_rmsnorm_low_precision_returns_input_dtype():
    x, w, z = norm_inputs(dtype=torch.float32)
    y = rmsnorm_gated_ref(x.bfloat16(), w.bfloat16(), z=z.bfloat16(), group_size=4)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), rmsnorm_gated_ref(x, w, z=z, group_size=4), rtol=3e-2, atol=3e-2)


# --- backend resolution -----------------------------------------------------------------------------

def test_resolve_backend_on_cpu():
    cpu = torch.device("cpu")
    assert BACKENDS == ("auto", "reference", "cuda")
    assert resolve_backend("reference", cpu) == "reference"
    assert resolve_backend("auto", cpu) == "reference"


def test_resolve_backend_cuda_on_cpu_names_the_fix():
    with pytest.raises(ValueError) as info:
        resolve_backend("cuda", torch.device("cpu"))
    msg = str(info.value)
    assert "cpu" in msg and "mamba_kernels='auto'" in msg and "GPU" in msg


@pytest.mark.parametrize("name", ["triton", "", "CUDA", "ref"])
def test_resolve_backend_unknown_name(name):
    with pytest.raises(ValueError, match="mamba_kernels must be one of") as info:
        resolve_backend(name, torch.device("cpu"))
    assert repr(name) in str(info.value)


def test_load_kernels_is_none_without_cuda():
    from m1_plugins.ops import load_kernels

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert load_kernels() is None


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_conv_by_documents_equals_reference(packed):
    """The CUDA fallback conv (documents behind zeros, one F.conv1d) == the reference, values and gradients."""
    from m1_plugins.ops.conv import causal_conv1d_by_documents

    torch.manual_seed(0)
    x = torch.randn(3, 10, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    seq_idx = None
    if packed:  # a 1-token document, documents shorter than the width, a boundary at the last position
        seq_idx = torch.zeros(3, 37, dtype=torch.long)
        seq_idx[0, 5:], seq_idx[0, 6:], seq_idx[1, 20:], seq_idx[2, 1:], seq_idx[2, 36:] = 1, 2, 1, 1, 2
    ref = causal_conv1d_ref(x, w, b, seq_idx=seq_idx)
    fast = causal_conv1d_by_documents(x, w, b, seq_idx=seq_idx)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad((ref * g).sum(), (x, w, b)), torch.autograd.grad((fast * g).sum(), (x, w, b))):
        torch.testing.assert_close(c, a, rtol=0, atol=1e-12)


def test_conv_by_documents_fuzz_boundaries():
    """Random document layouts, including runs of 1-token documents and starts closer than the width."""
    from m1_plugins.ops.conv import causal_conv1d_by_documents

    for trial in range(100):
        g = torch.Generator().manual_seed(trial)
        seqlen = int(torch.randint(1, 30, (1,), generator=g))
        x = torch.randn(2, 5, seqlen, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
        seq_idx = (torch.rand(2, seqlen, generator=g) < 0.3).long().cumsum(-1)
        ref, fast = causal_conv1d_ref(x, w, seq_idx=seq_idx), causal_conv1d_by_documents(x, w, seq_idx=seq_idx)
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
        for a, c in zip(torch.autograd.grad(ref.sum(), (x, w)), torch.autograd.grad(fast.sum(), (x, w))):
            torch.testing.assert_close(c, a, rtol=0, atol=1e-12)
