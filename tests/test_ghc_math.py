"""GHC math against an independent, loop-based reading of shared/spec/vwn-math.md ("Generalized Hyper-Connection").

Nothing here imports ``kernels/reference.py``: the expected values come from :func:`ghc_forward_loops`, which walks
tokens and slots in plain Python and computes in float64. The module under test (``vwn_transform.GHC`` and the
``torch.ops.vwn.*`` custom ops) is compared against it in forward, backward, low precision, at the paper init,
over a hypothesis-drawn range of shapes, and inside a whole widened GPT.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.gradcheck import GradcheckError

import vwn_transform
import vwn_transform.ops  # noqa: F401  (registers torch.ops.vwn.*)
from vwn_transform import GHC
from vwn_transform.models import GPT, GPTConfig
from vwn_transform.ops import stack_gates

F64 = torch.float64
DYNAMIC_NAMES = {"read", "carry", "write", "proj", "scale_read", "scale_carry", "scale_write", "norm.weight"}
STATIC_NAMES = {"read", "carry", "write"}
# (m, n, dim): slot widths d_b = dim/m of 64, 32, 16, 64, 16
SHAPES = [(1, 4, 64), (2, 3, 64), (4, 4, 64), (2, 8, 128), (8, 64, 128)]
SHAPE_IDS = [f"m{m}-n{n}-D{d}" for m, n, d in SHAPES]


# ------------------------------------------------------------------------------------------------------------
# the independent implementation of the spec
# ------------------------------------------------------------------------------------------------------------
def loop_coefficients(H, p, n, m, dynamic, eps):
    """Read (n, m), Carry (n, n), WriteT (n, m) of one token whose slots are ``H`` (a list of n vectors of width d)."""
    A_read, A_carry, B = p["read"], p["carry"], p["write"]
    assert A_read.shape == (n, m) and A_carry.shape == (n, n) and B.shape == (m, n)
    if not dynamic:
        return A_read, A_carry, B.T
    d = H[0].shape[0]
    W, g = p["proj"], p["norm.weight"]
    assert W.shape == (d, 2 * m + n) and g.shape == (d,)
    rows = []
    for k in range(n):
        rms = torch.sqrt((H[k] * H[k]).sum() / d + eps)
        Hn_k = H[k] / rms * g  # rmsnorm over this slot's d_b features; the gain is shared by all slots
        rows.append(torch.tanh((Hn_k @ W) / math.sqrt(d)))  # (2m+n,)
    c = torch.stack(rows)  # (n, 2m+n): row k depends only on slot k
    Read = A_read + p["scale_read"] * c[:, :m]  # (n, m)
    Carry = A_carry + p["scale_carry"] * c[:, m:m + n]  # (n, n)
    WriteT = B.T + p["scale_write"].T * c[:, m + n:]  # (n, m)
    return Read, Carry, WriteT


def loop_read(H, Read, n, m):
    """X = Read^T H: backbone slot i = sum_j Read[j, i] * H[j]."""
    return [sum(Read[j, i] * H[j] for j in range(n)) for i in range(m)]


def loop_write(H, Z, Carry, WriteT, n, m):
    """H'[k] = sum_i WriteT[k, i] Z[i] + sum_j Carry[j, k] H[j]."""
    return [sum(WriteT[k, i] * Z[i] for i in range(m)) + sum(Carry[j, k] * H[j] for j in range(n))
            for k in range(n)]


def split_slots(v, count):
    d = v.shape[0] // count
    return [v[k * d:(k + 1) * d] for k in range(count)]


def ghc_forward_loops(h, sublayer, params, n, m, dynamic, eps=1e-6, compute_dtype=F64):
    """vwn-math.md GHC forward, one token and one slot at a time.

    h: ``[..., n*d_b]``; params: ``{"read" (n,m), "carry" (n,n), "write" (m,n)}`` and, when dynamic, ``"proj"``
    (d_b, 2m+n), ``"scale_read"``, ``"scale_carry"``, ``"scale_write"``, ``"norm.weight"`` (d_b). Everything is
    cast to ``compute_dtype`` (float64 for the reference; bfloat16 for a deliberately naive low-precision run) and
    every arithmetic step rounds to it. ``sublayer`` gets ``x`` ``[..., m*d_b]`` in ``compute_dtype``. Differentiable.
    """
    lead = h.shape[:-1]
    d = h.shape[-1] // n
    assert n * d == h.shape[-1]
    p = {k: v.to(compute_dtype) for k, v in params.items()}
    flat = h.to(compute_dtype).reshape(-1, n * d)
    tokens = flat.shape[0]

    per_token, xs = [], []
    for t in range(tokens):
        H = split_slots(flat[t], n)  # slot k of token t, width d
        Read, Carry, WriteT = loop_coefficients(H, p, n, m, dynamic, eps)
        xs.append(torch.cat(loop_read(H, Read, n, m)))
        per_token.append((H, Carry, WriteT))

    x = torch.stack(xs).reshape(*lead, m * d)
    z = sublayer(x).to(compute_dtype).reshape(-1, m * d)  # the sublayer sees all tokens at once (attention)
    assert z.shape[0] == tokens
    outs = []
    for t, (H, Carry, WriteT) in enumerate(per_token):
        outs.append(torch.cat(loop_write(H, split_slots(z[t], m), Carry, WriteT, n, m)))
    return torch.stack(outs).reshape(*lead, n * d)


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def make_sublayer(dim):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


def ghc_own_params(ghc):
    """The GHC's own parameters by name (not the sublayer's)."""
    return {name: p for name, p in ghc.named_parameters() if not name.startswith("sublayer.")}


@torch.no_grad()
def perturb_ghc(ghc, gen, strength=1.0):
    """Move every GHC parameter off the paper init so that read, carry, write and the dynamic part all matter."""
    scales = {"read": 0.3, "carry": 0.3, "write": 0.3, "proj": 1.0, "scale_read": 0.3, "scale_carry": 0.3,
              "scale_write": 0.3, "norm.weight": 0.3}
    for name, p in ghc_own_params(ghc).items():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        p.add_(noise * scales[name] * strength)


def build(m, n, dim, dynamic, seed, dtype=torch.float32, sublayer=make_sublayer):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ghc = GHC(sublayer(dim), dim=dim, n=n, m=m, dynamic=dynamic)
    perturb_ghc(ghc, gen)
    return ghc.to(dtype), gen


def loop_reference(ghc, h, dynamic=None, compute_dtype=F64):
    """Run ghc_forward_loops with a float64 copy of the module's sublayer and parameters."""
    sub = copy.deepcopy(ghc.sublayer).to(compute_dtype)
    params = {k: v.detach() for k, v in ghc_own_params(ghc).items()}
    with torch.no_grad():
        return ghc_forward_loops(h.detach(), sub, params, ghc.n, ghc.m,
                                 ghc.dynamic if dynamic is None else dynamic, ghc.eps, compute_dtype)


def random_state(shape, n, gen, dtype=torch.float32):
    """Random over-width state whose n slots have different scales (0.25x .. 4x), so per-slot norms matter."""
    slot_scale = torch.exp(torch.empty(n).uniform_(math.log(0.25), math.log(4.0), generator=gen))
    h = torch.randn(*shape[:-1], n, shape[-1] // n, generator=gen) * slot_scale[:, None]
    return h.reshape(shape).to(dtype)


def max_err(got, ref):
    return float((got.detach().to(F64) - ref.detach().to(F64)).abs().max())


def assert_close_rel(got, ref, rel, what, floor=0.0):
    """max |got - ref| <= rel * max(max |ref|, floor) (+ a tiny absolute floor)."""
    scale = max(float(ref.detach().to(F64).abs().max()), floor)
    err = max_err(got, ref)
    assert err <= rel * scale + 1e-9, (
        f"{what}: max abs error {err:.3e} exceeds {rel:g} * max|expected| = {rel * scale:.3e} "
        f"(max|expected| = {scale:.3e})"
    )


# ------------------------------------------------------------------------------------------------------------
# 2. forward against the loop implementation, every parameter perturbed
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("m,n,dim", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_loop_implementation(m, n, dim, dynamic):
    ghc, gen = build(m, n, dim, dynamic, seed=10 * m + n)
    assert set(ghc_own_params(ghc)) == (DYNAMIC_NAMES if dynamic else STATIC_NAMES)
    batch, seq = (2, 3) if n <= 8 else (1, 3)
    h = random_state((batch, seq, n * dim // m), n, gen)
    with torch.no_grad():
        out = ghc(h)
    assert out.shape == h.shape and out.dtype == torch.float32
    ref = loop_reference(ghc, h)
    assert_close_rel(out, ref, 2e-5, f"GHC forward (m={m}, n={n}, D={dim}, dynamic={dynamic})")

    # the comparison has teeth: the GHC is far from the identity on this input
    assert max_err(out, h) > 0.1 * float(ref.abs().max())
    if dynamic:
        # the dynamic part is active: dropping it changes the result by much more than the tolerance
        static_ref = loop_reference(ghc, h, dynamic=False)
        assert max_err(static_ref, ref) > 0.05 * float(ref.abs().max()), "dynamic coefficients have no effect"


# ------------------------------------------------------------------------------------------------------------
# 3. gradients of h and of every parameter, by name
# ------------------------------------------------------------------------------------------------------------
def module_grads(ghc, h, cot):
    ghc.zero_grad(set_to_none=True)
    hh = h.clone().requires_grad_(True)
    out = ghc(hh)
    (out * cot).sum().backward()
    grads = {"h": hh.grad}
    grads.update({name: p.grad for name, p in ghc.named_parameters()})
    return out, grads


def loop_grads(ghc, h, cot):
    sub = copy.deepcopy(ghc.sublayer).double()
    for p in sub.parameters():
        p.grad = None
    params = {k: v.detach().double().requires_grad_(True) for k, v in ghc_own_params(ghc).items()}
    hh = h.detach().double().requires_grad_(True)
    out = ghc_forward_loops(hh, sub, params, ghc.n, ghc.m, ghc.dynamic, ghc.eps)
    (out * cot.double()).sum().backward()
    grads = {"h": hh.grad}
    grads.update({k: v.grad for k, v in params.items()})
    grads.update({f"sublayer.{k}": v.grad for k, v in sub.named_parameters()})
    return out, grads


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("m,n,dim", SHAPES, ids=SHAPE_IDS)
def test_gradients_match_loop_autograd(m, n, dim, dynamic):
    ghc, gen = build(m, n, dim, dynamic, seed=100 + 10 * m + n)
    batch, seq = (2, 3) if n <= 8 else (1, 2)
    h = random_state((batch, seq, n * dim // m), n, gen)
    cot = torch.randn(h.shape, generator=gen)
    _, ours = module_grads(ghc, h, cot)
    _, ref = loop_grads(ghc, h, cot)

    expected_names = {"h"} | (DYNAMIC_NAMES if dynamic else STATIC_NAMES) | {
        f"sublayer.{k}" for k, _ in ghc.sublayer.named_parameters()}
    assert set(ref) == expected_names
    assert set(ours) == expected_names, f"parameters differ: {set(ours) ^ expected_names}"
    for name in sorted(expected_names):
        assert ours[name] is not None, f"no gradient reached {name}"
        assert ours[name].shape == ref[name].shape, f"{name}: grad shape {ours[name].shape} vs {ref[name].shape}"
        assert ours[name].dtype == torch.float32, f"{name}: grad dtype {ours[name].dtype}"
        assert float(ref[name].abs().max()) > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        assert_close_rel(ours[name], ref[name], 2e-5, f"grad of {name} (m={m}, n={n}, D={dim}, dynamic={dynamic})")


@pytest.mark.parametrize("lead", [(), (5,), (2, 1, 3)], ids=["no-lead", "lead5", "lead2x1x3"])
def test_leading_dimensions_forward_and_backward(lead):
    """A single token (no leading dims) makes the dynamic coefficients 2-D; the math must not change."""
    m, n, dim = 2, 3, 8
    ghc, gen = build(m, n, dim, True, seed=7)
    h = random_state((*lead, n * dim // m), n, gen)
    cot = torch.randn(h.shape, generator=gen)
    out, ours = module_grads(ghc, h, cot)
    ref_out, ref = loop_grads(ghc, h, cot)
    assert out.shape == h.shape
    assert_close_rel(out, ref_out, 2e-5, f"forward with leading dims {lead}")
    assert set(ours) == set(ref)
    for name in ref:
        assert_close_rel(ours[name], ref[name], 2e-5, f"grad of {name} with leading dims {lead}")


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("m,n,d,lead", [(1, 1, 1, (1, 1)), (1, 1, 4, (1, 1)), (1, 1, 4, ()), (1, 1, 4, (3, 2)),
                                        (1, 2, 1, (1, 1)), (2, 2, 3, ())],
                         ids=["n1-d1-1tok", "n1-d4-1tok", "n1-d4-nolead", "n1-d4-6tok", "m1-n2-d1-1tok",
                              "m2-n2-d3-nolead"])
def test_degenerate_shapes_forward_and_backward(m, n, d, lead, dynamic):
    """n = m = 1 (a single stream, ratio 1), slot width 1, a single token: valid GHCs that must still work."""
    # no LayerNorm in this sublayer: at width 1-4 it would make several gradients vanish in exact arithmetic
    ghc, gen = build(m, n, m * d, dynamic, seed=13,
                     sublayer=lambda dim: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)))
    h = random_state((*lead, n * d), n, gen)
    cot = torch.randn(h.shape, generator=gen)
    try:
        out, ours = module_grads(ghc, h, cot)
    except RuntimeError as exc:
        raise AssertionError(
            f"GHC(dim={m * d}, n={n}, m={m}, dynamic={dynamic}) on h of shape {tuple(h.shape)} raised "
            f"{type(exc).__name__}: {str(exc)[:400]}"
        ) from None
    ref_out, ref = loop_grads(ghc, h, cot)
    assert_close_rel(out, ref_out.detach(), 2e-5, f"forward (m={m}, n={n}, d={d}, lead={lead})")
    assert set(ours) == set(ref)
    # a 1x1 layer can have a gradient that is tiny by cancellation: measure against 1% of the largest gradient
    floor = 1e-2 * max(float(g.abs().max()) for g in ref.values())
    for name in ref:
        assert_close_rel(ours[name], ref[name], 2e-5, f"grad of {name} (m={m}, n={n}, d={d}, lead={lead})",
                         floor=floor)


def test_slot_norm_eps_is_inside_the_root_and_per_slot():
    """Slots with RMS ~1e-3 (mean square ~ eps): where eps goes and which features are normalized now matter."""
    m, n, dim = 2, 4, 8
    ghc, gen = build(m, n, dim, True, seed=9)
    h = random_state((3, 4, n * dim // m), n, gen) * 1e-3
    cot = torch.randn(h.shape, generator=gen)
    out, ours = module_grads(ghc, h, cot)
    ref_out, ref = loop_grads(ghc, h, cot)
    ref_out = ref_out.detach()
    assert_close_rel(out, ref_out, 2e-5, "forward at slot RMS ~ sqrt(eps)")
    for name in ("h", "proj", "norm.weight", "scale_read"):
        assert_close_rel(ours[name], ref[name], 2e-5, f"grad of {name} at slot RMS ~ sqrt(eps)")
    # teeth: eps = 0 (or eps outside the root) gives a clearly different answer on this input
    sub = copy.deepcopy(ghc.sublayer).double()
    params = {k: v.detach() for k, v in ghc_own_params(ghc).items()}
    with torch.no_grad():
        no_eps = ghc_forward_loops(h, sub, params, n, m, True, eps=0.0)
    assert max_err(no_eps, ref_out) > 1e-3 * float(ref_out.abs().max())


# ------------------------------------------------------------------------------------------------------------
# 4. gradcheck on the custom ops
# ------------------------------------------------------------------------------------------------------------
def _op_inputs(kind, gen, lead=(2, 3), n=3, m=2, d=2):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).requires_grad_(True)

    h = r(*lead, n * d)
    if kind == "read_dynamic":
        args = (h, 1.0 + r(d, scale=0.3).detach(), r(d, 2 * m + n), r(n, m), r(n, n), r(m, n),
                r(n, m), r(n, n), r(m, n))
        args = tuple(a.detach().requires_grad_(True) for a in args)
        # the op takes the maps and the gate scales stacked [read | carry | write^T] (stack_gates, at call time, as
        # the GHC module does); the 4th output (saved stats for the backward) is not differentiable
        return (lambda h, gain, proj, read, carry, write, s_read, s_carry, s_write: torch.ops.vwn.ghc_read_dynamic(
            h, gain, proj, stack_gates(read, carry, write), stack_gates(s_read, s_carry, s_write), 1e-6)[:3]), args
    if kind == "read_static":
        return torch.ops.vwn.ghc_read_static, (h, r(n, m))
    z = r(*lead, m * d)
    if kind == "write_static":
        return torch.ops.vwn.ghc_write, (h, z, r(n, n), r(n, m))
    if kind == "write_dynamic":
        return torch.ops.vwn.ghc_write, (h, z, r(*lead, n, n), r(*lead, n, m))
    raise AssertionError(kind)


OP_KINDS = ["read_dynamic", "read_static", "write_static", "write_dynamic"]


def op_loop_reference(kind, args, n=3, m=2):
    """The op's outputs computed by the loop helpers in float64 (a tuple, one entry per op output)."""
    args = [a.detach().double() for a in args]
    h = args[0]
    lead = h.shape[:-1]
    flat_h = h.reshape(-1, h.shape[-1])
    outs = []
    if kind.startswith("read"):
        if kind == "read_dynamic":
            names = ["norm.weight", "proj", "read", "carry", "write", "scale_read", "scale_carry", "scale_write"]
            p = dict(zip(names, args[1:]))
        else:
            p = {"read": args[1], "carry": torch.eye(n, dtype=F64), "write": torch.zeros(m, n, dtype=F64)}
        xs, cs, ws = [], [], []
        for t in range(flat_h.shape[0]):
            H = split_slots(flat_h[t], n)
            Read, Carry, WriteT = loop_coefficients(H, p, n, m, kind == "read_dynamic", 1e-6)
            xs.append(torch.cat(loop_read(H, Read, n, m)))
            cs.append(Carry)
            ws.append(WriteT)
        x = torch.stack(xs).reshape(*lead, -1)
        if kind == "read_static":
            return (x,)
        return x, torch.stack(cs).reshape(*lead, n, n), torch.stack(ws).reshape(*lead, n, m)
    z, carry_c, write_c = args[1:]
    flat_z = z.reshape(-1, z.shape[-1])
    for t in range(flat_h.shape[0]):
        if carry_c.dim() == 2:
            Carry, WriteT = carry_c, write_c
        else:
            Carry, WriteT = carry_c.reshape(-1, n, n)[t], write_c.reshape(-1, n, m)[t]
        outs.append(torch.cat(loop_write(split_slots(flat_h[t], n), split_slots(flat_z[t], m), Carry, WriteT, n, m)))
    return (torch.stack(outs).reshape(h.shape),)


@pytest.mark.parametrize("kind", OP_KINDS)
def test_ops_forward_match_loops_at_float32_level(kind):
    fn, args = _op_inputs(kind, torch.Generator().manual_seed(3))
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = op_loop_reference(kind, args)
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape, f"vwn::{kind} output {i}: shape {tuple(o.shape)} vs {tuple(r.shape)}"
        assert_close_rel(o, r, 2e-6, f"vwn::{kind} output {i}")


@pytest.mark.parametrize("kind", OP_KINDS)
def test_ops_gradcheck_float64(kind):
    """Strict float64 gradcheck (torch defaults: eps 1e-6, atol 1e-5, rtol 1e-3)."""
    fn, args = _op_inputs(kind, torch.Generator().manual_seed(1))
    try:
        ok = torch.autograd.gradcheck(fn, args)
    except GradcheckError as exc:
        with torch.no_grad():
            outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        refs = op_loop_reference(kind, args)
        errs = [max_err(o, r) / max(float(r.abs().max()), 1e-30) for o, r in zip(outs, refs)]
        diagnosis = (
            f"its forward on float64 inputs returns dtypes {[str(o.dtype) for o in outs]} and differs from float64 "
            f"loop math by relative {max(errs):.1e}, i.e. it computes in float32 (kernels/reference.py casts with "
            f".float()); finite differences at eps=1e-6 then see float32 rounding"
            if max(errs) > 1e-12 else "its forward is float64-exact, so the backward formula itself is wrong"
        )
        raise AssertionError(f"float64 gradcheck of vwn::{kind} fails: {diagnosis}.\n{str(exc)[:500]}") from None
    assert ok


@pytest.mark.parametrize("kind", OP_KINDS)
def test_ops_gradcheck_float32_tolerance(kind):
    """The backward formulas of the ops, checked with a step and tolerances that float32 rounding cannot break."""
    fn, args = _op_inputs(kind, torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=2e-2)


def test_float64_inputs_keep_float64_precision():
    """A float64 model must not be silently computed in float32 (spec: mixing in fp32 *even when* bf16/fp16)."""
    m, n, dim = 2, 3, 8
    ghc, gen = build(m, n, dim, True, seed=3, dtype=F64)
    h = torch.randn(4, 5, n * dim // m, generator=gen, dtype=F64)
    with torch.no_grad():
        x, carry_c, write_c = ghc.contract(h)
        out = ghc(h)
    ref = loop_reference(ghc, h)
    err = max_err(out, ref)
    scale = float(ref.abs().max())
    assert out.dtype == F64 and x.dtype == F64
    problems = []
    if carry_c.dtype != F64 or write_c.dtype != F64:
        problems.append(f"coefficients come back as {carry_c.dtype}/{write_c.dtype}")
    if err > 1e-10 * scale:
        problems.append(f"GHC output differs from the float64 loop reference by {err:.3e} (max|ref| {scale:.3g}), "
                        f"float32-level rather than float64-level (<= {1e-10 * scale:.1e})")
    assert not problems, "float64 GHC runs in float32: " + "; ".join(problems)


# ------------------------------------------------------------------------------------------------------------
# 5. bf16 / fp16 state
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,n,dim", [(2, 3, 64), (8, 64, 128)], ids=["m2-n3", "m8-n64"])
def test_low_precision_state_dtype_and_accuracy(m, n, dim, dtype):
    ghc, gen = build(m, n, dim, True, seed=5, dtype=dtype)
    h = random_state((2, 3, n * dim // m), n, gen, dtype)
    with torch.no_grad():
        x, carry_c, write_c = ghc.contract(h)
        out = ghc(h)
    assert x.dtype == dtype and out.dtype == dtype, f"state dtype changed: x {x.dtype}, out {out.dtype}"
    assert carry_c.dtype == torch.float32 and write_c.dtype == torch.float32, "mixing coefficients not fp32"
    ref = loop_reference(ghc, h)  # float64, from the same (rounded) parameters and input
    # one bf16/fp16 rounding of the output and of x is ~2e-3 / ~3e-4 relative; allow a few of them
    rel = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close_rel(out, ref, rel, f"{dtype} GHC vs float64 loops (m={m}, n={n})")

    # backward in low precision: gradients keep the parameter dtype and stay finite
    hh = h.clone().requires_grad_(True)
    ghc(hh).float().pow(2).mean().backward()
    assert hh.grad.dtype == dtype and torch.isfinite(hh.grad.float()).all()
    for name, p in ghc.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert torch.isfinite(p.grad.float()).all(), name


def test_bf16_mixing_runs_in_fp32():
    """With n=64 slots, our bf16 path is far more accurate than the same math rounded to bf16 at every step."""
    m, n, dim = 8, 64, 128
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    # sublayer z = x/2: exact in every binary float format, so only the GHC mixing contributes error
    ghc = GHC(lambda x: 0.5 * x, dim=dim, n=n, m=m, dynamic=True)
    perturb_ghc(ghc, gen)
    ghc = ghc.to(dtype)
    h = torch.randn(2, 4, n * dim // m, generator=gen).to(dtype)
    with torch.no_grad():
        out = ghc(h)
    params = {k: v.detach() for k, v in ghc_own_params(ghc).items()}
    with torch.no_grad():
        ref = ghc_forward_loops(h, lambda x: 0.5 * x, params, n, m, True)
        naive = ghc_forward_loops(h, lambda x: 0.5 * x, params, n, m, True, compute_dtype=dtype)
    err_ours = float((out.double() - ref).abs().mean())
    err_naive = float((naive.double() - ref).abs().mean())
    # ours rounds once (fp32 mixing, one cast to bf16): about half a bf16 ulp of the output on average
    half_ulp = float((ref.abs() * 2.0 ** -9).mean())
    assert err_ours <= 1.5 * half_ulp, f"bf16 GHC error {err_ours:.3e} exceeds one rounding ({half_ulp:.3e})"
    assert err_ours * 3 < err_naive, (
        f"bf16 GHC mean error {err_ours:.3e} is not far below the all-bf16 mixing's {err_naive:.3e}: "
        "the mixing does not seem to run in fp32"
    )


# ------------------------------------------------------------------------------------------------------------
# 6. paper init, by behaviour
# ------------------------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.inner(x)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("m,n,dim", [(1, 4, 16), (2, 3, 16), (4, 4, 16), (2, 8, 16), (8, 64, 32)],
                         ids=["m1-n4", "m2-n3", "m4-n4", "m2-n8", "m8-n64"])
def test_paper_init_reads_first_slots_carries_identity_writes_k_mod_m(m, n, dim, dynamic):
    torch.manual_seed(0)
    sub = Recorder(make_sublayer(dim))
    ghc = GHC(sub, dim=dim, n=n, m=m, dynamic=dynamic)
    d = dim // m
    shapes = {"read": (n, m), "carry": (n, n), "write": (m, n)}
    if dynamic:
        shapes.update({"proj": (d, 2 * m + n), "scale_read": (n, m), "scale_carry": (n, n), "scale_write": (m, n),
                       "norm.weight": (d,)})
    assert {k: tuple(v.shape) for k, v in ghc_own_params(ghc).items()} == shapes

    h = torch.randn(3, 5, n * d)
    with torch.no_grad():
        out = ghc(h)
        z = sub.inner(h[..., :dim])
    torch.testing.assert_close(sub.seen, h[..., :dim], rtol=0, atol=1e-6,
                               msg="at the paper init the backbone input must be the first m slots")
    expected = torch.empty_like(h)
    for k in range(n):
        i = k % m
        expected[..., k * d:(k + 1) * d] = h[..., k * d:(k + 1) * d] + z[..., i * d:(i + 1) * d]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5,
                               msg="at the paper init H' must be H + z written to every slot k with k mod m == i")


# ------------------------------------------------------------------------------------------------------------
# 7. property-based
# ------------------------------------------------------------------------------------------------------------
@st.composite
def ghc_cases(draw):
    m = draw(st.integers(1, 4))
    return dict(
        d=draw(st.integers(1, 12)),
        m=m,
        n=draw(st.integers(m, m + 6)),
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, 5)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        dynamic=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=ghc_cases())
def test_property_forward_matches_loops(case):
    m, n, d = case["m"], case["n"], case["d"]
    ghc, gen = build(m, n, m * d, case["dynamic"], seed=case["seed"], dtype=case["dtype"])
    h = random_state((case["batch"], case["seq"], n * d), n, gen, case["dtype"])
    with torch.no_grad():
        out = ghc(h)
    assert out.shape == h.shape and out.dtype == case["dtype"]
    ref = loop_reference(ghc, h)
    rel = 1e-4 if case["dtype"] == torch.float32 else 1e-9
    assert_close_rel(out, ref, rel, f"GHC forward for {case}")


# ------------------------------------------------------------------------------------------------------------
# 8. a whole widened GPT against an independent forward
# ------------------------------------------------------------------------------------------------------------
def independent_gpt_forward(wide, idx, n, m):
    tr = wide.transformer
    D = wide.config.n_embd
    T = idx.shape[1]
    pos = torch.arange(T)
    w = lambda t: t.detach().double()  # noqa: E731
    h = torch.cat([w(tr.wte.weight)[idx], w(tr.wte.vwn_extra)[idx]], -1) \
        + torch.cat([w(tr.wpe.weight)[pos], w(tr.wpe.vwn_extra)[pos]], -1)  # [B, T, D']
    assert h.shape[-1] == n * D // m
    for block in tr.h:
        ln_1, attn = copy.deepcopy(block.ln_1).double(), copy.deepcopy(block.attn).double()
        ln_2, mlp = copy.deepcopy(block.ln_2).double(), copy.deepcopy(block.mlp).double()
        ghcs = block.vwn_ghc
        assert len(ghcs) == 2
        for j, sub in enumerate((lambda x: attn(ln_1(x)), lambda x: mlp(ln_2(x)))):
            params = {k: v.detach() for k, v in ghcs[j].named_parameters()}
            assert set(params) == DYNAMIC_NAMES
            h = ghc_forward_loops(h, sub, params, n, m, dynamic=True)
    ln_f = tr.ln_f
    assert getattr(ln_f, "vwn_group_norm_weight", None) is None, "preserve init should have no group norm"
    assert not getattr(ln_f, "vwn_pad_output", False)
    x = h @ w(ln_f.vwn_reduce).T  # [B, T, D]
    x = F.layer_norm(x, (D,), w(ln_f.weight), w(ln_f.bias), ln_f.eps)
    return x @ w(wide.lm_head.weight).T


@pytest.mark.parametrize("ratio,m_arg,m,n", [("3/2", None, 2, 3), (4, 2, 2, 8)], ids=["r1.5", "r4-m2"])
def test_widened_gpt_matches_independent_forward(ratio, m_arg, m, n):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(cfg).eval()
    wide = vwn_transform.widen(model, ratio, m=m_arg).eval()
    assert (wide.vwn_config.m, wide.vwn_config.n) == (m, n)

    gen = torch.Generator().manual_seed(42)
    vwn_names = [name for name, _ in wide.named_parameters() if "vwn" in name]
    expected = {f"transformer.h.{i}.vwn_ghc.{j}.{p}" for i in range(2) for j in range(2) for p in DYNAMIC_NAMES}
    expected |= {"transformer.wte.vwn_extra", "transformer.wpe.vwn_extra", "transformer.ln_f.vwn_reduce"}
    assert set(vwn_names) == expected
    params = dict(wide.named_parameters())
    ghc_scales = {"read": 0.3, "carry": 0.3, "write": 0.3, "proj": 1.0, "scale_read": 0.3, "scale_carry": 0.3,
                  "scale_write": 0.3, "norm.weight": 0.3}
    with torch.no_grad():
        for name in vwn_names:
            p = params[name]
            leaf = name.split("vwn_ghc.")[-1].split(".", 1)[-1] if "vwn_ghc" in name else None
            scale = ghc_scales[leaf] if leaf else (0.05 if "vwn_extra" in name else 0.2)
            p.add_(torch.randn(p.shape, generator=gen) * scale)

    idx = torch.randint(0, cfg.vocab_size, (2, 10), generator=gen)
    with torch.no_grad():
        got = wide(idx)[0]
        original = model(idx)[0]
        ref = independent_gpt_forward(wide, idx, n, m)
    assert got.shape == (2, 10, cfg.vocab_size)
    assert_close_rel(got, ref, 2e-5, f"widened GPT logits at ratio {ratio}")
    # the perturbation took the model well away from the original function, so the match is not trivial
    assert max_err(got, original) > 0.05 * float(ref.abs().max())
