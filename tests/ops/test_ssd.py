"""The SSD scan: chunked reference == recurrence == mamba-ssm's references; exact packing; gradients."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from m1_plugins.ops import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_step, ssd_step_ref

def import_mamba_ssm_or_skip():
    """Skip where mamba-ssm is not installed; where it is, import it through the package's own loader (which
    stubs the Mamba-1 CUDA extension a Python-only build lacks), so a broken install fails instead of skipping."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed")
    from m1_plugins.ops._kernels import _import_mamba_ssm

    _import_mamba_ssm()


BATCH, NHEADS, HEADDIM, DSTATE = 2, 4, 3, 5
LIMIT = (0.05, 0.3)  # tight enough that softplus(dt + dt_bias) is clamped on both sides


def make_inputs(seqlen, ngroups, dtype=torch.float64, batch=BATCH, nheads=NHEADS, headdim=HEADDIM, dstate=DSTATE):
    g = torch.Generator().manual_seed(1234 + seqlen + 7 * ngroups)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        x=r(batch, seqlen, nheads, headdim),
        dt=r(batch, seqlen, nheads) - 1.0,
        A=-torch.exp(r(nheads) * 0.5),
        B=r(batch, seqlen, ngroups, dstate),
        C=r(batch, seqlen, ngroups, dstate),
        D=r(nheads),
        dt_bias=r(nheads) * 0.5,
        init=r(batch, nheads, headdim, dstate),
    )


EXTRAS = {
    "plain": dict(),
    "D+dt_bias": dict(D=True, dt_bias=True),
    "D+dt_bias+init": dict(D=True, dt_bias=True, init=True),
    "dt_limit": dict(dt_bias=True, dt_limit=LIMIT, init=True),
}


def scan_kwargs(inp, extra):
    return dict(
        D=inp["D"] if extra.get("D") else None,
        dt_bias=inp["dt_bias"] if extra.get("dt_bias") else None,
        dt_limit=extra.get("dt_limit", (0.0, math.inf)),
    )


def run_steps(inp, extra, seqlen):
    state = inp["init"].clone() if extra.get("init") else torch.zeros_like(inp["init"])
    kw = scan_kwargs(inp, extra)
    ys = [ssd_step_ref(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t], **kw)
          for t in range(seqlen)]
    return torch.stack(ys, dim=1), state


def discretize(inp, extra):
    """dt after dt_bias, softplus and clamp (what the recurrence multiplies by)."""
    dt = inp["dt"] + (inp["dt_bias"] if extra.get("dt_bias") else 0)
    lo, hi = extra.get("dt_limit", (0.0, math.inf))
    return F.softplus(dt).clamp(min=lo, max=hi)


@pytest.mark.parametrize("extra", list(EXTRAS), ids=list(EXTRAS))
@pytest.mark.parametrize("seqlen", [13, 16])
@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("ngroups", [1, NHEADS])
def test_chunk_scan_equals_recurrence(ngroups, chunk_size, seqlen, extra):
    extra = EXTRAS[extra]
    inp = make_inputs(seqlen, ngroups)
    y, final = ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size,
                                  initial_states=inp["init"] if extra.get("init") else None, **scan_kwargs(inp, extra))
    y_ref, state_ref = run_steps(inp, extra, seqlen)
    assert y.shape == inp["x"].shape and y.dtype == torch.float64
    assert final.shape == (BATCH, NHEADS, HEADDIM, DSTATE)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, state_ref, rtol=1e-10, atol=1e-10)
    assert y.abs().max() > 0.1  # not trivially zero


def test_dt_limit_clamps():
    """The clamp is really applied: with a limit the output differs from the unclamped scan, and equals a
    scan whose raw dt was pre-discretised and fed without softplus."""
    inp = make_inputs(12, 1)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4)
    y_lim, s_lim = ssd_chunk_scan_ref(*args, dt_bias=inp["dt_bias"], dt_limit=LIMIT)
    y_free, _ = ssd_chunk_scan_ref(*args, dt_bias=inp["dt_bias"])
    dt_disc = discretize(inp, dict(dt_bias=True, dt_limit=LIMIT))
    assert (dt_disc == LIMIT[0]).any() and (dt_disc == LIMIT[1]).any()
    y_pre, s_pre = ssd_chunk_scan_ref(inp["x"], dt_disc, inp["A"], inp["B"], inp["C"], 4, dt_softplus=False)
    torch.testing.assert_close(y_lim, y_pre, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_lim, s_pre, rtol=1e-12, atol=1e-12)
    assert (y_lim - y_free).abs().max() > 1e-2


@pytest.mark.parametrize("extra", list(EXTRAS), ids=list(EXTRAS))
@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("ngroups", [1, NHEADS])
def test_chunk_scan_equals_mamba_ssm_minimal(ngroups, chunk_size, extra):
    import_mamba_ssm_or_skip()
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    extra = EXTRAS[extra]
    seqlen, block_len = 16, 8  # the minimal reference needs seqlen % block_len == 0; ours need not share it
    inp = make_inputs(seqlen, ngroups)
    y, final = ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size,
                                  initial_states=inp["init"] if extra.get("init") else None, **scan_kwargs(inp, extra))
    dt = discretize(inp, extra)
    rep = NHEADS // ngroups
    y_ref, final_ref = ssd_minimal_discrete(
        inp["x"] * dt[..., None], dt * inp["A"], inp["B"].repeat_interleave(rep, dim=2),
        inp["C"].repeat_interleave(rep, dim=2), block_len,
        initial_states=inp["init"][:, None] if extra.get("init") else None,
    )
    if extra.get("D"):
        y_ref = y_ref + inp["x"] * inp["D"][:, None]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("extra", list(EXTRAS), ids=list(EXTRAS))
@pytest.mark.parametrize("ngroups", [1, NHEADS])
def test_step_equals_mamba_ssm_selective_state_update_ref(ngroups, extra):
    import_mamba_ssm_or_skip()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    extra = EXTRAS[extra]
    inp = make_inputs(1, ngroups)
    x, dt, B, C = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0]
    state = inp["init"].clone()
    y = ssd_step_ref(state, x, dt, inp["A"], B, C, **scan_kwargs(inp, extra))

    # mamba-ssm's layout: dt (b, h, p), A (h, p, n), D (h, p), dt_bias (h, p); it has no dt_limit, so a clamped
    # dt is discretised beforehand and passed without softplus
    p, n = HEADDIM, DSTATE
    if "dt_limit" in extra:
        dt_m, bias_m, softplus = discretize(inp, extra)[:, 0], None, False
    else:
        dt_m, softplus = dt, True
        bias_m = inp["dt_bias"][:, None].expand(NHEADS, p) if extra.get("dt_bias") else None
    state_ref = inp["init"].clone()
    y_ref = selective_state_update_ref(
        state_ref, x, dt_m[..., None].expand(BATCH, NHEADS, p), inp["A"][:, None, None].expand(NHEADS, p, n), B, C,
        D=inp["D"][:, None].expand(NHEADS, p) if extra.get("D") else None, dt_bias=bias_m, dt_softplus=softplus,
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=1e-12, atol=1e-12)
    assert not torch.equal(state, inp["init"])  # updated in place


def test_dispatchers_reference_backend():
    inp = make_inputs(10, 2)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], initial_states=inp["init"])
    y, s = ssd_chunk_scan(*args, backend="reference", **kw)
    y_ref, s_ref = ssd_chunk_scan_ref(*args, **kw)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    s1, s2 = inp["init"].clone(), inp["init"].clone()
    step_args = (inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])
    assert torch.equal(ssd_step(s1, *step_args, D=inp["D"], dt_bias=inp["dt_bias"], backend="reference"),
                       ssd_step_ref(s2, *step_args, D=inp["D"], dt_bias=inp["dt_bias"]))
    assert torch.equal(s1, s2)


def test_fp32_input_computes_in_fp32_and_returns_input_dtype():
    inp = {k: v.float() for k, v in make_inputs(9, 1).items()}
    y, s = ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4, D=inp["D"])
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    inp64 = make_inputs(9, 1)
    y64, _ = ssd_chunk_scan_ref(inp64["x"], inp64["dt"], inp64["A"], inp64["B"], inp64["C"], 4, D=inp64["D"])
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    # bf16 in, bf16 out, fp32 state
    yb, sb = ssd_chunk_scan_ref(inp["x"].bfloat16(), inp["dt"].bfloat16(), inp["A"], inp["B"].bfloat16(),
                                inp["C"].bfloat16(), 4)
    assert yb.dtype == torch.bfloat16 and sb.dtype == torch.float32


# --- packing: documents separated by seq_idx --------------------------------------------------------------

DOC_LENGTHS = [[5, 1, 11, 7], [8, 16]]  # row 0: boundaries inside chunks, a 1-token doc; row 1: on a boundary
PACKED_LEN = 24


def seq_idx_for(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def packed_inputs(ngroups=2, requires_grad=False):
    inp = make_inputs(PACKED_LEN, ngroups)
    if requires_grad:
        for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "init"):
            inp[k].requires_grad_(True)
    return inp


def packed_scan(inp, chunk_size, with_init):
    return ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size,
                              seq_idx=seq_idx_for(DOC_LENGTHS), initial_states=inp["init"] if with_init else None,
                              D=inp["D"], dt_bias=inp["dt_bias"])


def separate_scans(inp, chunk_size, with_init):
    """The packed scan's outputs assembled from one scan per document (initial_states feed document 0 only)."""
    rows_y, rows_final = [], []
    for b, lengths in enumerate(DOC_LENGTHS):
        start, ys = 0, []
        for d, n in enumerate(lengths):
            sl = slice(start, start + n)
            init = inp["init"][b : b + 1] if (with_init and d == 0) else None
            yd, fd = ssd_chunk_scan_ref(inp["x"][b : b + 1, sl], inp["dt"][b : b + 1, sl], inp["A"],
                                        inp["B"][b : b + 1, sl], inp["C"][b : b + 1, sl], chunk_size,
                                        initial_states=init, D=inp["D"], dt_bias=inp["dt_bias"])
            ys.append(yd)
            start += n
        rows_y.append(torch.cat(ys, dim=1))
        rows_final.append(fd)  # the last document's final state
    return torch.cat(rows_y), torch.cat(rows_final)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 8, 32])
def test_packed_equals_separate_documents(chunk_size, with_init):
    inp = packed_inputs()
    y, final = packed_scan(inp, chunk_size, with_init)
    y_sep, final_sep = separate_scans(inp, chunk_size, with_init)
    torch.testing.assert_close(y, y_sep, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_sep, rtol=1e-10, atol=1e-10)
    # the boundaries matter: without seq_idx, later documents see earlier ones
    y_nopack, _ = ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size,
                                     D=inp["D"], dt_bias=inp["dt_bias"])
    assert (y_nopack[0, 5:] - y_sep[0, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("with_init", [False, True])
def test_packed_gradients_equal_separate_documents(with_init):
    torch.manual_seed(0)
    names = ("x", "dt", "A", "B", "C", "D", "dt_bias") + (("init",) if with_init else ())
    grads = []
    for mode in ("packed", "separate"):
        inp = packed_inputs(requires_grad=True)
        w_y = torch.randn(BATCH, PACKED_LEN, NHEADS, HEADDIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        w_s = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        y, final = (packed_scan if mode == "packed" else separate_scans)(inp, 8, with_init)
        loss = (y * w_y).sum() + (final * w_s).sum()
        g = torch.autograd.grad(loss, [inp[k] for k in names])
        assert all(torch.isfinite(t).all() for t in g)
        grads.append(g)
    for name, gp, gs in zip(names, *grads):
        torch.testing.assert_close(gp, gs, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad of {name}: {m}")
        assert gp.abs().max() > 0


def test_gradcheck_with_seq_idx():
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    b, l, h, p, ng, n = 1, 7, 2, 2, 1, 3
    x, dt, B, C = r(b, l, h, p), r(b, l, h), r(b, l, ng, n), r(b, l, ng, n)
    A = (-torch.rand(h, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    D, dt_bias, init = r(h), r(h), r(b, h, p, n)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1, 2]])  # boundaries inside and at the start of chunk 2

    def fn(x, dt, A, B, C, D, dt_bias, init):
        return ssd_chunk_scan_ref(x, dt, A, B, C, 4, D=D, dt_bias=dt_bias, initial_states=init, seq_idx=seq_idx)

    assert torch.autograd.gradcheck(fn, (x, dt, A, B, C, D, dt_bias, init), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 32])
def test_independent_of_chunk_size(chunk_size):
    inp = packed_inputs(ngroups=1)
    seq_idx = seq_idx_for(DOC_LENGTHS)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], initial_states=inp["init"], seq_idx=seq_idx, dt_limit=(0.0, 2.0))
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    y, s = ssd_chunk_scan_ref(*args, chunk_size, **kw)
    y5, s5 = ssd_chunk_scan_ref(*args, 5, **kw)
    torch.testing.assert_close(y, y5, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s5, rtol=1e-10, atol=1e-10)


def test_no_nan_with_strong_decay_and_many_documents():
    """Documents of length 1 everywhere (every step a -inf decay) and large |A| dt: still finite, = D x + x dt B.C."""
    inp = make_inputs(12, 1)
    A = inp["A"] * 50
    seq_idx = torch.arange(12).expand(BATCH, 12)
    y, s = ssd_chunk_scan_ref(inp["x"], inp["dt"] + 3, A, inp["B"], inp["C"], 4, D=inp["D"], seq_idx=seq_idx)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    dt = F.softplus(inp["dt"] + 3)
    expected = inp["x"] * (dt * (inp["B"] * inp["C"]).sum(-1))[..., None] + inp["x"] * inp["D"][:, None]
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
