"""Fused Triton GHC kernels vs the reference math: forward and backward on odd shapes and in three dtypes (on the
CPU through TRITON_INTERPRET=1, set in conftest.py; natively on a GPU with the `gpu` marker), outputs poisoned
with NaN, gradients compared by name through the custom ops, a 5-step training parity run, and dispatch."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vwn_transform
from vwn_transform import ops
from vwn_transform.kernels import measured
from vwn_transform.kernels import reference as ref
from vwn_transform.kernels import triton_ops as tri
from vwn_transform.kernels.measured import auto_choice
from vwn_transform.kernels.reference import stack_gates
from vwn_transform.kernels.triton_common import interpreting
from vwn_transform.models import GPT, GPTConfig
from vwn_transform import VWNConfig

# (m, n, N, d): one token and many (the FMA kernels (n <= 8) at 577, the tensor-core ones (n > 8), which the
# interpreter runs a token at a time (~0.1-0.2 s each at (8, 64)), at 37: several programs natively, a ragged last
# one), at slot widths that are not powers of two
CASES = [(m, n, N, d) for m, n, many in [(1, 4, 577), (2, 3, 577), (4, 4, 577), (8, 64, 37)]
         for N, d in [(1, 24), (many, 40)]]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def nan_poisoned_outputs(monkeypatch):
    """Every torch.empty/empty_like made while the kernels run is filled with NaN: unwritten memory shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as mp:
        mp.setattr(torch, "empty", empty)
        mp.setattr(torch, "empty_like", empty_like)
        yield


def make_inputs(N, m, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, low=None):
        t = torch.randn(*shape, generator=g) * scale
        return (t.abs() + low if low is not None else t).to(DEVICE)

    h = rnd(N, n, d).to(dtype)
    params = dict(norm_weight=rnd(d, scale=0.3, low=0.5), proj=rnd(d, 2 * m + n, scale=0.5),
                  read=rnd(n, m), carry=rnd(n, n), write=rnd(m, n), scale_read=rnd(n, m, scale=0.5),
                  scale_carry=rnd(n, n, scale=0.5), scale_write=rnd(m, n, scale=0.5))
    return h, params


def read_args(p):
    """The dynamic read's parameter arguments from the separate GHC parameters: ``(norm_weight, proj, gates,
    scales)``, the maps and the gate scales stacked as the ops take them."""
    return (p["norm_weight"], p["proj"], stack_gates(p["read"], p["carry"], p["write"]),
            stack_gates(p["scale_read"], p["scale_carry"], p["scale_write"]))


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def kernel_cases(N, m, n, d, dtype, seed=0):
    """(name, reference outputs, triton outputs, fp64 outputs) for every kernel, forward and backward."""
    h, p = make_inputs(N, m, n, d, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    gx = torch.randn(N, m, d, generator=g).to(DEVICE, dtype)
    gcc, gwc = torch.randn(N, n, n, generator=g).to(DEVICE), torch.randn(N, n, m, generator=g).to(DEVICE)
    z = torch.randn(N, m, d, generator=g).to(DEVICE, dtype)
    gout = torch.randn(N, n, d, generator=g).to(DEVICE, dtype)
    args = (*read_args(p), 1e-6)
    cc_dyn, wc_dyn = torch.randn(N, n, n, generator=g).to(DEVICE), torch.randn(N, n, m, generator=g).to(DEVICE)

    def run(lib, cast):
        hh, zz, gg, gxx = cast(h), cast(z), cast(gout), cast(gx)
        fwd = lib.read_dynamic(hh, *args)
        stats = fwd[3] if cast(h).dtype != torch.float64 else fwd[3]
        out = {"read_dynamic": fwd,
               "read_dynamic_backward": lib.read_dynamic_backward(hh, *args, stats, gxx, gcc, gwc),
               "read_static": (lib.read_static(hh, p["read"]),),
               "read_static_backward": lib.read_static_backward(hh, p["read"], gxx)}
        for kind, (cc, wc) in {"dynamic": (cc_dyn, wc_dyn), "static": (p["carry"], p["write"].t())}.items():
            out[f"write_{kind}"] = (lib.write(hh, zz, cc, wc),)
            out[f"write_{kind}_backward"] = lib.write_backward(hh, zz, cc, wc, gg)
        return out

    want = run(ref, lambda t: t)
    exact = run(ref, lambda t: t.double())
    got = run(tri, lambda t: t)
    return want, got, exact


@pytest.mark.parametrize("m,n,N,d", CASES)
def test_kernels_match_reference_fp32(m, n, N, d, monkeypatch):
    with nan_poisoned_outputs(monkeypatch):
        want, got, _ = kernel_cases(N, m, n, d, torch.float32)
    for name in want:
        for i, (w, g) in enumerate(zip(want[name], got[name])):
            assert g.shape == w.shape and g.dtype == w.dtype, (name, i)
            assert torch.isfinite(g).all(), f"{name}[{i}] has unwritten (NaN) entries"
            assert rel_err(g, w) <= 2e-5, (name, i, rel_err(g, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,N", [(2, 3, 577), (8, 64, 17)])
def test_kernels_low_precision_within_twice_the_reference_error(dtype, m, n, N, monkeypatch):
    with nan_poisoned_outputs(monkeypatch):
        want, got, exact = kernel_cases(N, m, n, 40, dtype, seed=3)
    for name in want:
        for i, (w, g, e) in enumerate(zip(want[name], got[name], exact[name])):
            assert g.dtype == w.dtype and torch.isfinite(g).all(), (name, i)
            ref_error = rel_err(w, e)
            assert rel_err(g, e) <= 2 * ref_error + 1e-6, (name, i, rel_err(g, e), ref_error)


@pytest.mark.parametrize("m,n,N,d", [(2, 3, 577, 24), (8, 64, 5, 40), (1, 4, 1, 40)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_custom_op_gradients_by_name(m, n, N, d, dynamic):
    """One GHC step through torch.ops.vwn (read, a sublayer, write) with each implementation; every gradient."""
    h, p = make_inputs(N, m, n, d, torch.float32, seed=5)
    z_w = torch.randn(d, d, generator=torch.Generator().manual_seed(9)).to(DEVICE) / d ** 0.5
    cot = torch.randn(N, n * d, generator=torch.Generator().manual_seed(11)).to(DEVICE)

    def step(impl):
        ops.set_impl(impl)
        try:
            leaves = {"h": h.reshape(N, n * d).clone().requires_grad_()}
            leaves.update({k: v.clone().requires_grad_() for k, v in p.items()})
            if dynamic:
                x, cc, wc, _ = torch.ops.vwn.ghc_read_dynamic(leaves["h"], *read_args(leaves), 1e-6)
            else:
                x = torch.ops.vwn.ghc_read_static(leaves["h"], leaves["read"])
                cc, wc = leaves["carry"], leaves["write"].t()
            z = torch.tanh(x.reshape(N, m, d) @ z_w).reshape(N, m * d)  # a stand-in sublayer
            out = torch.ops.vwn.ghc_write(leaves["h"], z, cc, wc)
            names = [k for k, v in leaves.items()]
            grads = torch.autograd.grad((out * cot).sum(), list(leaves.values()), allow_unused=True)
            return out.detach(), dict(zip(names, grads)), ops.implementations_used()
        finally:
            ops.set_impl(None)

    ops.reset_implementations_used()
    out_ref, g_ref, used_ref = step("reference")
    ops.reset_implementations_used()
    out_tri, g_tri, used_tri = step("triton")
    assert set(used_ref.values()) == {"reference"} and set(used_tri.values()) == {"triton"}
    assert rel_err(out_tri, out_ref) <= 2e-5
    for name, g in g_ref.items():
        if g is None:
            assert g_tri[name] is None, name
            continue
        assert rel_err(g_tri[name], g) <= 2e-5, (name, rel_err(g_tri[name], g))


def test_training_parity_three_steps():
    """r=4 (2, 8): the FMA dynamic read at its largest gate count (one block: its GHCs, the fused write+read inside it,
    the widened embedding and final norm; CI time). Tolerance: 1e-5 on losses and parameters in
    fp32. Adam turns gradient rounding differences into update differences of up to ~lr per step for near-zero
    gradients, so the learning rate is kept at 1e-3."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    base = GPT(cfg)
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))

    def train(impl):
        model = vwn_transform.widen(base, 4, m=2, init="paper").train()
        opt = torch.optim.AdamW(vwn_transform.param_groups(model, 0.1), lr=1e-3)
        ops.set_impl(impl)
        losses = []
        try:
            for _ in range(3):
                loss = model(idx[:, :-1], idx[:, 1:])[1]
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        finally:
            ops.set_impl(None)
        return losses, dict(model.named_parameters())

    torch.manual_seed(1)
    loss_ref, p_ref = train("reference")
    torch.manual_seed(1)
    loss_tri, p_tri = train("triton")
    assert loss_ref[-1] < loss_ref[0]
    for a, b in zip(loss_tri, loss_ref):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    for name, p in p_ref.items():
        assert (p_tri[name] - p).abs().max().item() <= 1e-5, name


# ------------------------------------------------------------------------------------------------------------
# the FMA write + carry (n <= 8): per-slot tiles, unrolled FMAs (kernels/triton_write_fma.py)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,N,d", [(2, 3, 577, 40), (1, 4, 1, 24), (4, 4, 33, 300), (8, 8, 5, 40),
                                     (2, 3, 9, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fma_write_matches_reference(m, n, N, d, dtype, monkeypatch):
    """Forward and backward, per-token and static coefficients, outputs NaN-poisoned: fp32 within 2e-5 of the
    reference; bf16 within twice the reference's own error against fp64 (d=300 and 129 take several steps of
    the backward's loop over d, with a ragged last one)."""
    from vwn_transform.kernels import triton_write_fma as fma

    assert fma.supports(n, m)
    g = torch.Generator().manual_seed(31)
    h, z, gout = (torch.randn(N, s, d, generator=g).to(DEVICE, dtype) for s in (n, m, n))
    cases = {"dynamic": (torch.randn(N, n, n, generator=g), torch.randn(N, n, m, generator=g)),
             "static": (torch.randn(n, n, generator=g), torch.randn(n, m, generator=g))}
    for kind, (cc, wc) in cases.items():
        cc, wc = cc.to(DEVICE), wc.to(DEVICE)
        with nan_poisoned_outputs(monkeypatch):
            got = (fma.write(h, z, cc, wc),) + fma.write_backward(h, z, cc, wc, gout)
        want = (ref.write(h, z, cc, wc),) + ref.write_backward(h, z, cc, wc, gout)
        exact = (ref.write(h.double(), z.double(), cc.double(), wc.double()),) + \
            ref.write_backward(h.double(), z.double(), cc.double(), wc.double(), gout.double())
        for i, (a, w, e) in enumerate(zip(got, want, exact)):
            assert a.shape == w.shape and a.dtype == w.dtype, (kind, i)
            assert torch.isfinite(a).all(), f"{kind}[{i}] has unwritten (NaN) entries"
            limit = 2e-5 if dtype == torch.float32 else 2 * rel_err(w, e) + 1e-6
            assert rel_err(a, e if dtype != torch.float32 else w) <= limit, (kind, i, rel_err(a, w))


@pytest.mark.parametrize("family,m,n", [("triton_write_fma", 2, 3), ("triton_tc", 3, 12)])
def test_write_mixed_dtypes_and_determinism(family, m, n):
    """An fp32 state with a bf16 sublayer output (autocast) promotes like the reference, and the fp32 result is
    fp32-accurate (within 1e-6 of fp64: the tensor-core kernel must not keep the bf16 product's coefficients to
    16 bits because the operand is bf16); the static coefficient gradients (per-program partials + a fixed-order
    sum) are bitwise reproducible."""
    import importlib

    lib = importlib.import_module(f"vwn_transform.kernels.{family}")
    g = torch.Generator().manual_seed(32)
    N, d = 300 if family.endswith("fma") else 40, 24
    h = torch.randn(N, n, d, generator=g).to(DEVICE)
    z = torch.randn(N, m, d, generator=g).to(DEVICE, torch.bfloat16)
    for cc, wc in [(torch.randn(n, n, generator=g), torch.randn(n, m, generator=g)),
                   (torch.randn(N, n, n, generator=g), torch.randn(N, n, m, generator=g))]:
        cc, wc = cc.to(DEVICE), wc.to(DEVICE)
        out = lib.write(h, z, cc, wc)
        exact = ref.write(h.double(), z.double(), cc.double(), wc.double())
        assert out.dtype == torch.float32 and rel_err(out, exact) <= 1e-6, rel_err(out, exact)
    gout = torch.randn(N, n, d, generator=g).to(DEVICE)
    first = lib.write_backward(h, z, cc, wc, gout)
    want = ref.write_backward(h, z, cc, wc, gout)
    for a, w in zip(first, want):
        assert a.dtype == w.dtype and rel_err(a, w) <= 2e-5
    cc, wc = cc[0], wc[0]  # static coefficients: gradients summed over tokens from per-program partials
    first = lib.write_backward(h, z, cc, wc, gout)
    second = lib.write_backward(h, z, cc, wc, gout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("m,n,N,d", [(2, 3, 129, 300), (2, 8, 5, 40), (8, 8, 9, 24), (1, 1, 3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fma_reads_match_reference(m, n, N, d, dtype, monkeypatch):
    """The FMA reads (kernels/triton_read_fma.py), outputs NaN-poisoned: static read and, where its gates fit in
    registers, the dynamic read forward and backward, also with an incoming dL/dH added in the kernel (the fused
    write+read); fp32 within 2e-5 of the reference, bf16 within twice the reference's own error against fp64.
    d=300 walks several chunks with a ragged last one; (8, 8) has no FMA dynamic read (its 192 gate values
    spill), which the dispatcher must respect."""
    from vwn_transform.kernels import triton_read_fma as rf

    h, p = make_inputs(N, m, n, d, dtype, seed=41)
    g = torch.Generator().manual_seed(42)
    gx = torch.randn(N, m, d, generator=g).to(DEVICE, dtype)
    gcc, gwc = torch.randn(N, n, n, generator=g).to(DEVICE), torch.randn(N, n, m, generator=g).to(DEVICE)
    g_in = torch.randn(N, n, d, generator=g).to(DEVICE, dtype)
    args = read_args(p) + (1e-6,)

    def run(lib, cast, dynamic):
        hh, gxx = cast(h), cast(gx)
        out = {"read_static": (lib.read_static(hh, p["read"]),) + lib.read_static_backward(hh, p["read"], gxx)}
        if dynamic:
            fwd = lib.read_dynamic(hh, *args)
            stats = ref.read_dynamic(hh, *args)[3]  # both backwards from the same statistics
            out["read_dynamic"] = fwd + lib.read_dynamic_backward(hh, *args, stats, gxx, gcc, gwc)
            if lib is rf:
                gh_in = lib.read_dynamic_backward(hh, *args, stats, gxx, gcc, gwc, grad_in=cast(g_in))[0]
            else:
                gh_in = (lib.read_dynamic_backward(hh, *args, stats, gxx, gcc, gwc)[0].double() + cast(g_in).double())
            out["read_dynamic_grad_in"] = (gh_in,)
        return out

    dynamic = rf.supports_dynamic(n, m)
    assert rf.supports(n, m) and dynamic == ((m, n) != (8, 8))
    with nan_poisoned_outputs(monkeypatch):
        got = run(rf, lambda t: t, dynamic)
    want, exact = run(ref, lambda t: t, dynamic), run(ref, lambda t: t.double(), dynamic)
    for name in want:
        for i, (a, w, e) in enumerate(zip(got[name], want[name], exact[name])):
            assert a.shape == w.shape and (a.dtype == w.dtype or name.endswith("grad_in")), (name, i)
            assert torch.isfinite(a).all(), f"{name}[{i}] has unwritten (NaN) entries"
            if dtype == torch.float32:
                assert rel_err(a, w) <= 2e-5, (name, i, rel_err(a, w))
            else:
                assert rel_err(a, e) <= 2 * rel_err(w, e) + 1e-6, (name, i, rel_err(a, e), rel_err(w, e))
    if dynamic:  # parameter gradients: fixed-order sums of per-program partials, bitwise reproducible
        again = rf.read_dynamic_backward(h, *args, ref.read_dynamic(h, *args)[3], gx, gcc, gwc)
        assert all(torch.equal(a, b) for a, b in zip(again, got["read_dynamic"][4:]))


# d = 160: a multiple of 16, so the aligned launches of triton_tc.LAUNCH (the others run the unaligned ones)
@pytest.mark.parametrize("m,n,N,d", [(3, 12, 5, 300), (8, 8, 9, 24), (16, 64, 3, 24), (8, 33, 5, 40),
                                     (3, 12, 5, 160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_core_kernels_match_reference(m, n, N, d, dtype, monkeypatch):
    """The tensor-core kernels (kernels/triton_tc.py) on their own, outputs NaN-poisoned: write + carry (per-token
    and static coefficients, forward and backward), static read, dynamic read forward and backward, also with an
    incoming dL/dH added in the kernel (the fused write+read); against fp64, within twice the reference's own
    error (fp32: at least 2e-5). Odd slot counts (12 and 33 pad to 16 and 64), the largest (16, 64), n = m at
    (8, 8) (where the dispatcher sends the dynamic read here), d=300 (several chunks, ragged last). Static and
    parameter gradients are fixed-order sums of partials: bitwise reproducible."""
    from vwn_transform.kernels import triton_tc as tc

    h, p = make_inputs(N, m, n, d, dtype, seed=51)
    g = torch.Generator().manual_seed(52)
    gx, z = (torch.randn(N, m, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    gout, g_in = (torch.randn(N, n, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    gcc, cc = (torch.randn(N, n, n, generator=g).to(DEVICE) for _ in range(2))
    gwc, wc = (torch.randn(N, n, m, generator=g).to(DEVICE) for _ in range(2))
    args = read_args(p) + (1e-6,)
    stats = ref.read_dynamic(h, *args)[3]  # both backwards from the same statistics

    def run(lib, cast):
        hh, zz, gg, gxx = cast(h), cast(z), cast(gout), cast(gx)
        out = {"write": (lib.write(hh, zz, cc, wc),) + lib.write_backward(hh, zz, cc, wc, gg),
               "write_static": ((lib.write(hh, zz, p["carry"], p["write"].t()),)
                                + lib.write_backward(hh, zz, p["carry"], p["write"].t(), gg)),
               "read_static": (lib.read_static(hh, p["read"]),) + lib.read_static_backward(hh, p["read"], gxx),
               "read_dynamic": lib.read_dynamic(hh, *args) + lib.read_dynamic_backward(hh, *args, stats, gxx, gcc,
                                                                                         gwc)}
        if lib is tc:
            gh_in = lib.read_dynamic_backward(hh, *args, stats, gxx, gcc, gwc, grad_in=cast(g_in))[0]
        else:
            gh_in = lib.read_dynamic_backward(hh, *args, stats, gxx, gcc, gwc)[0].double() + cast(g_in).double()
        out["read_dynamic_grad_in"] = (gh_in,)
        return out

    with nan_poisoned_outputs(monkeypatch):
        got = run(tc, lambda t: t)
    want, exact = run(ref, lambda t: t), run(ref, lambda t: t.double())
    for name in want:
        for i, (a, w, e) in enumerate(zip(got[name], want[name], exact[name])):
            assert a.shape == w.shape and (a.dtype == w.dtype or name.endswith("grad_in")), (name, i)
            assert torch.isfinite(a).all(), f"{name}[{i}] has unwritten (NaN) entries"
            # against fp64: a sum over tokens that cancels is a few 1e-5 off in the fp32 reference too (at (1, 1),
            # 3 tokens, dL/dscale_read, one sum of 3 products ~1, cancelled to 1e-3: ill-conditioned for both)
            limit = max(2e-5, 2 * rel_err(w, e)) if dtype == torch.float32 else 2 * rel_err(w, e) + 1e-6
            assert rel_err(a, e) <= limit, (name, i, rel_err(a, e), rel_err(w, e))
    again = tc.read_dynamic_backward(h, *args, stats, gx, gcc, gwc)
    assert all(torch.equal(a, b) for a, b in zip(again, got["read_dynamic"][4:]))
    again = tc.write_backward(h, z, p["carry"], p["write"].t(), gout)
    assert all(torch.equal(a, b) for a, b in zip(again, got["write_static"][1:]))


@pytest.mark.parametrize("m,n,N,d", [(3, 12, 11, 300), (8, 16, 8, 40), (1, 9, 1, 24), (5, 30, 7, 40),
                                     (8, 40, 5, 300), (8, 40, 5, 160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_tensor_core_kernels_match_reference(m, n, N, d, dtype, monkeypatch):
    """The batched tensor-core kernels ("tc-v2", several tokens per program) also where the per-token ones run by
    default (NP = 16): the dynamic read forward (x, coefficients, statistics) and the write + carry forward and
    backward with per-token and static maps, against fp64 within twice the reference's own error (fp32: at least
    2e-5), outputs NaN-poisoned; the static maps' gradients (per-program partials) bitwise reproducible. Token
    counts below, at and above a program's tokens (11 = 8 + 3), d=300 (ragged last chunk), slot counts that pad.
    Where a batched kernel has no spill-free launch (triton_tc.LAUNCH None: the write backward at NP = 64, the fp32
    one at NP = 32, the fp32 write forward at NP = 64 and an unaligned d) its per-token form runs, as the host
    functions decide."""
    from vwn_transform.kernels import triton_common, triton_tc as tc

    monkeypatch.setattr(triton_common, "PER_TOKEN_TC", set())
    assert triton_common.tc_batched_tokens(n) == 128 // triton_common.pow2(n) > 1
    bf16 = dtype == torch.bfloat16
    assert tc._tokens("dynamic_fwd", n, d, bf16) > 1  # the batched dynamic read forward runs in every case
    # the batched write kernels wherever they have a launch (bf16: both up to NP = 32, the forward at NP = 64)
    for key in ("write_fwd", "write_bwd"):
        launch = tc.LAUNCH[(triton_common.pow2(n), bf16, triton_common.aligned(d))][f"{key}_batched"]
        assert (tc._tokens(key, n, d, bf16) > 1) == (launch is not None), key
        assert launch is not None or not bf16 or (key, triton_common.pow2(n)) == ("write_bwd", 64), key
    h, p = make_inputs(N, m, n, d, dtype, seed=61)
    g = torch.Generator().manual_seed(62)
    z = torch.randn(N, m, d, generator=g).to(DEVICE, dtype)
    gout = torch.randn(N, n, d, generator=g).to(DEVICE, dtype)
    cc, wc = torch.randn(N, n, n, generator=g).to(DEVICE), torch.randn(N, n, m, generator=g).to(DEVICE)
    args = read_args(p) + (1e-6,)

    def run(lib, cast):
        hh, zz, gg = cast(h), cast(z), cast(gout)
        return {"read_dynamic": lib.read_dynamic(hh, *args),
                "write": (lib.write(hh, zz, cc, wc),) + lib.write_backward(hh, zz, cc, wc, gg),
                "write_static": ((lib.write(hh, zz, p["carry"], p["write"].t()),)
                                 + lib.write_backward(hh, zz, p["carry"], p["write"].t(), gg))}

    with nan_poisoned_outputs(monkeypatch):
        got = run(tc, lambda t: t)
    want, exact = run(ref, lambda t: t), run(ref, lambda t: t.double())
    for name in want:
        for i, (a, w, e) in enumerate(zip(got[name], want[name], exact[name])):
            assert a.shape == w.shape and a.dtype == w.dtype and torch.isfinite(a).all(), (name, i)
            limit = max(2e-5, 2 * rel_err(w, e)) if a.dtype == torch.float32 else 2 * rel_err(w, e) + 1e-6
            assert rel_err(a, e) <= limit, (name, i, rel_err(a, e), rel_err(w, e))
    again = tc.write_backward(h, z, p["carry"], p["write"].t(), gout)
    assert all(torch.equal(a, b) for a, b in zip(again, got["write_static"][1:]))


@pytest.mark.skipif(torch.cuda.is_available() and not interpreting(),
                    reason="runs the kernels on CPU tensors, i.e. through the Triton interpreter")
def test_dispatch_is_explicit(monkeypatch):
    h = torch.randn(3, 3 * 8)
    read = torch.randn(3, 2)
    ops.reset_implementations_used()
    torch.ops.vwn.ghc_read_static(h, read)
    assert ops.implementations_used() == {"ghc_read_static": "reference"}  # auto on the CPU
    assert ops.implementations_used(reasons=True) == {"ghc_read_static": ("reference", "cpu tensors")}
    ops.set_impl("triton")
    try:
        torch.ops.vwn.ghc_read_static(h, read)
        assert ops.implementations_used() == {"ghc_read_static": "triton"}
        with pytest.raises(RuntimeError, match=r"\(m, n\) = \(2, 65\) is outside the kernels' range"):
            torch.ops.vwn.ghc_read_static(torch.randn(2, 65 * 4), torch.randn(65, 2))
        with pytest.raises(RuntimeError, match="support .* got torch.float64"):
            torch.ops.vwn.ghc_read_static(h.double(), read.double())
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
            torch.ops.vwn.ghc_read_static(h, read)
    finally:
        ops.set_impl(None)


REWRITTEN = {"write": "fma-v1", "read_static": "fma-v1", "read_dynamic": "fma-v9", "write_read_dynamic": "fma-v9"}


def test_auto_follows_the_measured_table():
    """VWN_IMPL=auto on CUDA: Triton only where the measured table says the kernel that runs beat the reference
    forward+backward, for forward and backward alike; everything else the reference."""
    bf16 = torch.bfloat16
    choice, why = auto_choice("ghc_write", 2, 3, bf16, 1024, 16384)
    assert choice == "triton" and "0.205 ms vs reference 4.028 ms" in why and "H200" in why
    assert auto_choice("ghc_write_backward", 2, 3, bf16, 1024, 16384)[0] == "triton"  # the backward follows
    assert auto_choice("ghc_read_static", 2, 3, bf16, 2048, 65536)[0] == "triton"  # within the size bucket
    assert auto_choice("ghc_read_static_backward", 8, 16, bf16, 256, 8192)[0] == "triton"
    for op in ("ghc_read_dynamic", "ghc_read_dynamic_backward", "ghc_write_read_dynamic"):
        assert auto_choice(op, 2, 3, bf16, 1024, 16384)[0] == "triton", op
    for call, says in [(("ghc_write", 2, 8, bf16, 1024, 16384), "no measurement"),
                       (("ghc_write", 2, 3, torch.float32, 1024, 16384), "no measurement"),
                       (("ghc_read_static", 8, 64, bf16, 256, 16384), "no measurement"),  # faulted: no row
                       (("ghc_write", 2, 3, bf16, 1024, 1), "not near"),  # decode-sized calls
                       (("ghc_write", 2, 3, bf16, 4096, 16384), "not near")]:
        choice, why = auto_choice(*call)
        assert choice == "reference" and says in why, (call, why)
    # a rewritten kernel (another id than the row's) is unmeasured: the reference, and the reason says so
    for op in ("ghc_read_dynamic", "ghc_read_dynamic_backward", "ghc_write_read_dynamic"):
        choice, why = auto_choice(op, 2, 3, bf16, 1024, 16384, REWRITTEN)
        assert choice == "reference" and "which is no longer the one that runs ('fma-v9'" in why, why
    # a row where Triton was slower keeps the reference
    slower = measured.Measurement("write", 4, 4, bf16, 2048, 16384, "fma-v1", (1.0, 2.0), (0.5, 2.5))
    old = measured.MEASURED
    measured.MEASURED = old + (slower,)
    try:
        choice, why = auto_choice("ghc_write", 4, 4, bf16, 512, 16384)
        assert choice == "reference" and why.startswith("measured slower"), why
    finally:
        measured.MEASURED = old
    assert measured.kernel_id("write", 8, 16) == "tc-v1" and measured.kernel_id("write", 2, 8) == "fma-v1"
    # the FMA dynamic read (and the write+read built on it) only where its n(2m+n) gate values fit in registers
    assert measured.kernel_id("read_dynamic", 2, 8) == "fma-v2"
    assert measured.kernel_id("write_read_dynamic", 2, 3) == "fma-v1+fma-v2"
    assert measured.kernel_id("read_dynamic", 8, 8) == "tc-v1"
    assert measured.kernel_id("write_read_dynamic", 8, 8) == "fma-v1+tc-v1"
    assert measured.kernel_id("read_static", 8, 8) == "fma-v1" and measured.kernel_id("read_static", 3, 2) == "tc-v1"
    # the tensor-core write and dynamic read: the per-token kernels at NP = 16 (measured), the batched ones above
    assert measured.kernel_id("read_dynamic", 8, 16) == "tc-v1" and measured.kernel_id("write", 8, 16) == "tc-v1"
    assert measured.kernel_id("read_dynamic", 8, 64) == "tc-v2" and measured.kernel_id("read_dynamic", 4, 17) == "tc-v2"
    assert measured.kernel_id("write_read_dynamic", 8, 64) == "tc-v2" and measured.kernel_id("write", 8, 64) == "tc-v2"
    assert measured.kernel_id("read_static", 8, 64) == "tc-v1"  # no batched static read
    with pytest.raises(ValueError, match="unknown op 'read'"):
        measured.kernel_id("read", 2, 3)
    # every row names the kernel it measured, and that is a kernel that ships now
    shipped = {measured.kernel_id(r.op, r.m, r.n) for r in measured.MEASURED}
    assert {r.kernel for r in measured.MEASURED} == shipped


def test_auto_dispatch_on_cuda_uses_the_table(monkeypatch):
    """ops._resolve with VWN_IMPL=auto on a (stand-in) CUDA state: the table's choice and reason are recorded
    (with the measured kernels standing in for the ones that run, so that a row says Triton)."""
    from types import SimpleNamespace

    def cuda_state(tokens, n, d, dtype):
        return SimpleNamespace(device=SimpleNamespace(type="cuda"), shape=(tokens, n * d), dtype=dtype,
                               dim=lambda: 2, numel=lambda: tokens * n * d)

    monkeypatch.setattr(ops, "_triton_obstacle", lambda *args: None)
    monkeypatch.setenv("VWN_IMPL", "auto")
    ops.reset_implementations_used()
    bf16 = torch.bfloat16
    assert ops._resolve("ghc_write", cuda_state(16384, 3, 1024, bf16), (3, 2)) is tri
    assert ops._resolve("ghc_read_dynamic", cuda_state(16384, 3, 1024, bf16), (3, 2)) is tri
    assert ops._resolve("ghc_read_static", cuda_state(16384, 64, 256, bf16), (64, 8)) is ref
    used = ops.implementations_used(reasons=True)
    assert used["ghc_write"][0] == "triton" and "measured faster" in used["ghc_write"][1]
    assert used["ghc_read_dynamic"][0] == "triton"
    assert "no measurement" in used["ghc_read_static"][1]
    monkeypatch.setattr(measured, "kernel_id", lambda op, m, n: "fma-v9")  # a rewritten kernel: unmeasured
    assert ops._resolve("ghc_read_dynamic", cuda_state(16384, 3, 1024, bf16), (3, 2)) is ref
    assert "no longer the one that runs" in ops.implementations_used(reasons=True)["ghc_read_dynamic"][1]
    monkeypatch.setattr(ops, "_triton_obstacle", lambda *args: "triton is not installed")
    assert ops._resolve("ghc_write", cuda_state(16384, 3, 1024, bf16), (3, 2)) is ref
    assert ops.implementations_used(reasons=True)["ghc_write"] == ("reference", "triton is not installed")
    ops.reset_implementations_used()


@pytest.mark.gpu  # deselected by the CPU test command (-m "not gpu"); run on a GPU with: pytest -m gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(2, 3), (8, 16), (8, 64)])
def test_kernels_realistic_shapes_on_gpu(dtype, m, n):
    """Against fp64: within twice the reference's own error (+2e-5 in fp32). Not against the fp32 reference: its
    static coefficient gradients are one fp32 GEMM over 16384 x d products, off by up to ~1e-4 relative (CPU
    reference, (2, 3), interpreter run of the FMA write: reference 2.9e-5 and 8.0e-5, the kernel 1.6e-7 and
    3.9e-7 against fp64)."""
    want, got, exact = kernel_cases(16384, m, n, 2048 // m, dtype)
    for name in want:
        for i, (w, g, e) in enumerate(zip(want[name], got[name], exact[name])):
            limit = 2 * rel_err(w, e) + (2e-5 if g.dtype == torch.float32 else 1e-6)  # fp32 outputs: +2e-5
            assert rel_err(g, e) <= limit, (name, i, rel_err(g, e), rel_err(w, e))


# ------------------------------------------------------------------------------------------------------------
# recompute: coefficients recomputed in the backward instead of stored
# ------------------------------------------------------------------------------------------------------------
def _dropped_bytes(model, idx):
    from vwn_transform.modules import _Recomputed

    before = _Recomputed.dropped_bytes
    model(idx, idx)
    return _Recomputed.dropped_bytes - before


# CI time: the reference only; recomputation is the same op call again whichever implementation runs it (a
# recompute=True model under the Triton kernels, gradients included, runs in
# test_blocks_run_the_fused_op_and_keep_gradients[triton])
@pytest.mark.parametrize("impl", ["reference"])
def test_recompute_gives_the_same_gradients_with_less_memory(impl):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    base = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    grads, saved = {}, {}
    ops.set_impl(impl)
    try:
        for recompute in (False, True):
            torch.manual_seed(1)
            wide = vwn_transform.widen(base, config=VWNConfig(n=4, m=2, init="paper", recompute=recompute)).train()
            assert all(g.recompute == recompute for g in wide.modules() if isinstance(g, vwn_transform.GHC))
            loss = wide(idx, idx)[1]
            loss.backward()
            grads[recompute] = {k: p.grad.clone() for k, p in wide.named_parameters()}
            saved[recompute] = _dropped_bytes(wide, idx)
    finally:
        ops.set_impl(None)
    for k, g in grads[False].items():
        assert torch.equal(grads[True][k], g), k  # the same kernels recompute the same values
    # per GHC call: stats [N, n, 2m+n+1] + carry [N, n, n] + write [N, n, m] in fp32, 4 GHC calls, N = 32 tokens
    n, m, tokens = 4, 2, 32
    expected = 4 * tokens * n * ((2 * m + n + 1) + n + m) * 4
    assert saved[False] == 0 and saved[True] == expected


# ------------------------------------------------------------------------------------------------------------
# cross-layer fusion: write of sublayer l + coefficients/read of sublayer l+1
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,N,d", [(2, 3, 577, 24), (8, 64, 5, 40), (1, 4, 1, 24), (4, 4, 33, 40)])
@pytest.mark.parametrize("static_write", [False, True])
def test_fused_write_read_matches_write_then_read(m, n, N, d, static_write, monkeypatch):
    h, p = make_inputs(N, m, n, d, torch.float32, seed=21)
    g = torch.Generator().manual_seed(22)
    z = torch.randn(N, m, d, generator=g).to(DEVICE)
    cc = torch.randn(n, n, generator=g) if static_write else torch.randn(N, n, n, generator=g)
    wc = torch.randn(n, m, generator=g) if static_write else torch.randn(N, n, m, generator=g)
    cc, wc = cc.to(DEVICE), wc.to(DEVICE)
    args = read_args(p) + (1e-6,)
    cot = [torch.randn(N, n, d, generator=g), torch.randn(N, m, d, generator=g), torch.randn(N, n, n, generator=g),
           torch.randn(N, n, m, generator=g)]
    cot = [c.to(DEVICE) for c in cot]
    # the unfused meaning, on the reference
    h_new = ref.write(h, z, cc, wc)
    want = (h_new,) + ref.read_dynamic(h_new, *args)
    g_read = ref.read_dynamic_backward(h_new, *args, want[4], cot[1], cot[2], cot[3])
    want_g = ref.write_backward(h, z, cc, wc, (g_read[0] + cot[0])) + tuple(g_read[1:])
    for lib in (ref, tri):
        with nan_poisoned_outputs(monkeypatch):
            got = lib.write_read_dynamic(h, z, cc, wc, *args)
            got_g = lib.write_read_dynamic_backward(h, z, cc, wc, *args, got[0], got[4], *cot)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.isfinite(a).all() and rel_err(a, b) <= 2e-5, (lib.__name__, "fwd", i, rel_err(a, b))
        for i, (a, b) in enumerate(zip(got_g, want_g)):
            assert a.shape == b.shape and rel_err(a, b) <= 2e-5, (lib.__name__, "bwd", i, rel_err(a, b))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_blocks_run_the_fused_op_and_keep_gradients(impl):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    wide = vwn_transform.widen(GPT(cfg), 4, m=2, init="paper").train()
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    source = next(iter(wide.transformer.h[0].vwn_runner.sources.values()))
    assert "ghc_write_read_dynamic" in source  # attention's write fused with the MLP's read
    # the same model with recompute=True: its GHCs keep their contract/expand methods, which the fusion pass
    # leaves alone (the recomputation needs the two halves)
    unfused = vwn_transform.widen(GPT(cfg), config=VWNConfig(n=8, m=2, init="paper", recompute=True)).train()
    unfused.load_state_dict(wide.state_dict())
    assert "ghc_write_read_dynamic" not in next(iter(unfused.transformer.h[0].vwn_runner.sources.values()))
    ops.set_impl(impl)
    ops.reset_implementations_used()
    try:
        loss = wide(idx, idx)[1]
        loss.backward()
        fused = {k: p.grad.clone() for k, p in wide.named_parameters()}
        assert ops.implementations_used()["ghc_write_read_dynamic"] == impl
        loss2 = unfused(idx, idx)[1]
        loss2.backward()
    finally:
        ops.set_impl(None)
    assert abs(loss.item() - loss2.item()) <= 1e-6
    for k, p in unfused.named_parameters():
        assert rel_err(p.grad, fused[k]) <= 1e-5, k


@pytest.mark.parametrize("dynamic_coefficients", [True, False])
def test_custom_ops_pass_opcheck(dynamic_coefficients):
    """torch.library.opcheck: schemas, fake kernels (shapes and strides), autograd registration."""
    N, m, n, d = 5, 2, 3, 8
    h, p = make_inputs(N, m, n, d, torch.float32, seed=12)
    h = h.reshape(N, n * d)
    params = [t.detach().requires_grad_() for t in read_args(p)]
    z = torch.randn(N, m * d, requires_grad=True)
    x, cc, wc, _ = torch.ops.vwn.ghc_read_dynamic(h, *params, 1e-6)
    if not dynamic_coefficients:
        cc, wc = p["carry"], p["write"].t().contiguous()
    cases = [
        (torch.ops.vwn.ghc_read_dynamic.default, (h.clone().requires_grad_(), *params, 1e-6)),
        (torch.ops.vwn.ghc_read_static.default, (h.clone().requires_grad_(), p["read"])),
        (torch.ops.vwn.ghc_write.default, (h.clone().requires_grad_(), z, cc.detach().requires_grad_(),
                                           wc.detach().requires_grad_())),
        (torch.ops.vwn.ghc_write_read_dynamic.default, (h.clone().requires_grad_(), z, cc.detach().requires_grad_(),
                                                        wc.detach().requires_grad_(), *params, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # the backward ops: their fake kernels must give the real strides (inductor asserts them)
    with torch.no_grad():
        hh = h.detach()
        x, cc2, wc2, stats = torch.ops.vwn.ghc_read_dynamic(hh, *params, 1e-6)
        h_new, x2, cc3, wc3, stats2 = torch.ops.vwn.ghc_write_read_dynamic(hh, z, cc.detach(), wc.detach(), *params,
                                                                            1e-6)
    detached = [q.detach() for q in params]
    backward_cases = [
        (torch.ops.vwn.ghc_read_dynamic_backward.default,
         (hh, *detached, 1e-6, stats, torch.randn_like(x), torch.randn_like(cc2), torch.randn_like(wc2))),
        (torch.ops.vwn.ghc_read_static_backward.default, (hh, p["read"].detach(), torch.randn_like(x))),
        (torch.ops.vwn.ghc_write_backward.default, (hh, z.detach(), cc.detach(), wc.detach(), torch.randn_like(hh))),
        (torch.ops.vwn.ghc_write_read_dynamic_backward.default,
         (hh, z.detach(), cc.detach(), wc.detach(), *detached, 1e-6, h_new, stats2, torch.randn_like(h_new),
          torch.randn_like(x2), torch.randn_like(cc3), torch.randn_like(wc3))),
    ]
    for op, args in backward_cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
