"""Mixed precision: the vwn ops under torch.autocast (what HF Trainer(bf16=True/fp16=True) and torch.amp do).

Policy under test (vwn_transform/ops.py, the comment above AUTOCAST_DEVICE_TYPES): every op, forward and backward,
has an explicit AutocastCPU/AutocastCUDA kernel that casts nothing and runs the op as outside autocast (fp32
mixing); ghc_write promotes the state and sublayer dtypes like ``s + z``, so the residual stream keeps the dtype
the un-widened model has under autocast.

* per op and implementation (reference; Triton through TRITON_INTERPRET=1 on tiny shapes), bf16 and fp16 CPU
  autocast: forward and backward against the fp32 computation, and against the same op with autocast off;
* whole widened tiny HF models (Llama, GPT-2; r=1.5 and r=4 m=2; dynamic and static GHC) under bf16 CPU autocast:
  logits against the fp32 widened model and the un-widened model under the same autocast, residual-stream dtype,
  gradients against fp32; a model that is itself bf16; recompute=True;
* torch.compile (aot_eager, the vwn backend, inductor) on a tiny two-GHC model against eager, under autocast;
* every op in the vwn namespace declares its autocast kernels.

Tolerances are relative to the largest magnitude of the fp32 result (``rel_err``): bf16 keeps 8 mantissa bits
(one rounding ~4e-3), fp16 11 bits (~5e-4); a few roundings through a model stay below ~4x that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vwn_transform
from vwn_transform import GHC, VWNConfig, ops
from vwn_transform.models.hf_tiny import tiny_hf_model
from vwn_transform.ops import stack_gates

AC_DTYPES = [torch.bfloat16, torch.float16]
# composite (a linear feeding the op, then the op) under autocast vs the fp32 computation
OP_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
# whole tiny models: logits, and per-parameter gradients (norm of the difference / norm of the fp32 gradient)
MODEL_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.bfloat16: 1e-1, torch.float16: 2e-2}
EPS = 1e-6
PARAMS = ("norm_weight", "proj", "read", "carry", "write", "scale_read", "scale_carry", "scale_write")


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def norm_rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.fixture(params=["reference", "triton"])
def impl(request):
    ops.set_impl(request.param)
    ops.reset_implementations_used()
    try:
        yield request.param
        assert set(ops.implementations_used().values()) == {request.param}  # nothing fell back silently
    finally:
        ops.set_impl(None)
        ops.reset_implementations_used()


# ------------------------------------------------------------------------------------------------------------
# per op
# ------------------------------------------------------------------------------------------------------------
B, T, M, N, D = 2, 3, 2, 3, 8  # tokens [B, T], (m, n) = (2, 3), slot width 8: one Triton program per kernel


def make_leaves(dtype=torch.float32, seed=0):
    """fp32 (or ``dtype``) leaves of one GHC step: the state ``h``, an activation ``a`` and the weight ``w`` of the
    linear that makes the sublayer output ``z = a @ w^T`` (so autocast casts z as it would in a model), per-token
    coefficients and the dynamic read's parameters."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, low=None):
        t = torch.randn(*shape, generator=g) * scale
        return (t.abs() + low if low is not None else t).to(dtype)

    return dict(
        h=rnd(B, T, N * D), a=rnd(B, T, M * D), w=rnd(M * D, M * D, scale=(M * D) ** -0.5),
        carry_c=rnd(B, T, N, N, scale=0.5), write_c=rnd(B, T, N, M, scale=0.5),
        norm_weight=rnd(D, scale=0.3, low=0.5), proj=rnd(D, 2 * M + N, scale=0.5), read=rnd(N, M), carry=rnd(N, N),
        write=rnd(M, N), scale_read=rnd(N, M, scale=0.5), scale_carry=rnd(N, N, scale=0.5),
        scale_write=rnd(M, N, scale=0.5),
    )


def _z(t):
    return t["z"] if "z" in t else F.linear(t["a"], t["w"])


def _read_params(t):
    """The dynamic read's parameter arguments: the gain, the projection and the stacked maps and gate scales."""
    return (t["norm_weight"], t["proj"], stack_gates(t["read"], t["carry"], t["write"]),
            stack_gates(t["scale_read"], t["scale_carry"], t["scale_write"]))


def _read_dynamic(t):
    return torch.ops.vwn.ghc_read_dynamic(t["h"], *_read_params(t), EPS)[:3]  # x, carry_c, write_c


def _read_static(t):
    return (torch.ops.vwn.ghc_read_static(t["h"], t["read"]),)


def _write_dynamic(t):
    return (torch.ops.vwn.ghc_write(t["h"], _z(t), t["carry_c"], t["write_c"]),)


def _write_static(t):
    return (torch.ops.vwn.ghc_write(t["h"], _z(t), t["carry"], t["write"].t()),)


def _write_read_dynamic(t):
    return torch.ops.vwn.ghc_write_read_dynamic(t["h"], _z(t), t["carry_c"], t["write_c"], *_read_params(t),
                                                EPS)[:4]  # h_new, x, carry_c, write_c


CASES = {"read_dynamic": _read_dynamic, "read_static": _read_static, "write_dynamic": _write_dynamic,
         "write_static": _write_static, "write_read_dynamic": _write_read_dynamic}
USES = {"read_dynamic": {"h", *PARAMS}, "read_static": {"h", "read"},
        "write_dynamic": {"h", "a", "w", "carry_c", "write_c"}, "write_static": {"h", "a", "w", "carry", "write"},
        "write_read_dynamic": {"h", "a", "w", "carry_c", "write_c", *PARAMS}}


def run_case(case, leaves, autocast_dtype):
    """Outputs and gradients of every leaf the case uses; the backward runs inside the autocast region too, so
    the backward ops go through their autocast kernels."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()
              if k in USES[case] or (k == "z" and "a" in USES[case])}
    g = torch.Generator().manual_seed(7)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        outs = CASES[case](leaves)
        loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def state_outputs(case):
    """Indices of the outputs in the state/activation dtype (the rest are fp32 coefficients)."""
    return {"read_dynamic": [0], "write_read_dynamic": [0, 1]}.get(case, [0])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ac", AC_DTYPES, ids=["bf16", "fp16"])
def test_op_under_autocast_matches_fp32(case, ac, impl):
    """An fp32 model under autocast: fp32 state and parameters, the sublayer output z comes from an autocast
    linear (bf16/fp16). Outputs keep fp32 (promote), results and gradients are within the dtype's rounding of
    the fp32 computation; and the op itself computes exactly what it computes outside autocast."""
    leaves = make_leaves()
    want, want_g = run_case(case, leaves, None)
    got, got_g = run_case(case, leaves, ac)
    for i, (o, w) in enumerate(zip(got, want)):
        assert o.dtype == torch.float32, (i, o.dtype)  # promote: the fp32 state stays fp32, coefficients fp32
        assert rel_err(o, w) <= OP_TOL[ac], (i, rel_err(o, w))
    for k, w in want_g.items():
        assert got_g[k].dtype == torch.float32
        assert rel_err(got_g[k], w) <= OP_TOL[ac], (k, rel_err(got_g[k], w))

    # the op on exactly the inputs autocast hands it (z already in the autocast dtype): autocast on == off
    if "a" in USES[case]:
        with torch.autocast("cpu", dtype=ac):
            leaves["z"] = F.linear(leaves["a"], leaves["w"]).detach()
        assert leaves["z"].dtype == ac
        uses_z = {k for k in USES[case] if k not in ("a", "w")} | {"z"}
        leaves = {k: v for k, v in leaves.items() if k in uses_z}
    off, off_g = run_case(case, leaves, None)
    on, on_g = run_case(case, leaves, ac)
    for i, (o, w) in enumerate(zip(on, off)):
        assert o.dtype == w.dtype
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6, msg=f"output {i}")
    for k, w in off_g.items():
        assert on_g[k].dtype == leaves[k].dtype, k  # each gradient in the dtype of its input (z: the autocast one)
        torch.testing.assert_close(on_g[k], w, rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_op_on_a_bf16_model_under_autocast(case, impl):
    """A model that is itself bf16 (``model.to(torch.bfloat16)``) under bf16 autocast: every input bf16, outputs
    in bf16 (coefficients fp32), within bf16 rounding of the fp32 computation on the same values."""
    leaves = make_leaves(torch.bfloat16)
    want, want_g = run_case(case, {k: v.float() for k, v in leaves.items()}, None)
    got, got_g = run_case(case, leaves, torch.bfloat16)
    for i, (o, w) in enumerate(zip(got, want)):
        assert o.dtype == (torch.bfloat16 if i in state_outputs(case) else torch.float32), (i, o.dtype)
        assert rel_err(o, w) <= OP_TOL[torch.bfloat16], (i, rel_err(o, w))
    for k, w in want_g.items():
        assert got_g[k].dtype == torch.bfloat16, k
        assert rel_err(got_g[k], w) <= 2 * OP_TOL[torch.bfloat16], (k, rel_err(got_g[k], w))


@pytest.mark.parametrize("fused", [False, True], ids=["write", "write_read_dynamic"])
def test_write_promotes_state_and_sublayer_dtypes_like_add(fused, impl):
    """``H'`` has the dtype of ``h + z`` (either may be the narrower one), with and without autocast, in the
    kernels and in the fake (meta) implementation torch.compile plans with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = make_leaves()
    fn = _write_read_dynamic if fused else _write_dynamic
    for h_dtype, z_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        args = dict(t, h=t["h"].to(h_dtype), z=F.linear(t["a"], t["w"]).to(z_dtype))
        exact = fn(dict(args, h=args["h"].float(), z=args["z"].float()))  # upcasts are exact
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn(args)
            assert out[0].dtype == torch.float32, (h_dtype, z_dtype, autocast)
            for o, e in zip(out, exact):
                torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6)
        with FakeTensorMode() as mode:
            fake = fn({k: mode.from_tensor(v) for k, v in args.items()})
        assert [f.dtype for f in fake] == [o.dtype for o in out]


# ------------------------------------------------------------------------------------------------------------
# the registration itself
# ------------------------------------------------------------------------------------------------------------
def test_every_vwn_op_declares_its_autocast_kernels():
    """Every op in the vwn namespace (not only the ones ops.py lists: a new op without the registration fails)
    has an AutocastCPU and an AutocastCUDA kernel, and does not inherit autocast's fallthrough."""
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vwn::")}
    assert set(ops.op_names()) | set(ops.backward_op_names()) <= names
    assert len(names) >= 8
    for name in sorted(names):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
    assert ops.AUTOCAST_DISPATCH_KEYS == {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


# ------------------------------------------------------------------------------------------------------------
# whole widened Hugging Face models
# ------------------------------------------------------------------------------------------------------------
FINAL_NORM = {"llama": lambda m: m.model.norm, "gpt2": lambda m: m.transformer.ln_f}


def forward(model, family, ids, autocast_dtype=None):
    """``(logits fp32, loss, dtype of the residual stream at the final norm)``."""
    seen = []
    handle = FINAL_NORM[family](model).register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    try:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(ids, labels=ids)
    finally:
        handle.remove()
    return out.logits.float(), out.loss, seen[0]


@torch.no_grad()
def perturb_ghc(model, seed=3):
    """Move every GHC parameter off the function-preserving init, so the mixing and the gates do something."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, GHC):
            for p in mod.parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if mod.dynamic:
                mod.proj.add_(torch.randn(mod.proj.shape, generator=g))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ratio,m", [(1.5, None), (4, 2)], ids=["r1.5", "r4m2"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_widened_hf_model_under_bf16_autocast(family, ratio, m, dynamic):
    ac = torch.bfloat16
    narrow = tiny_hf_model(family)
    wide = vwn_transform.widen(narrow, ratio, m=m, dynamic=dynamic)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))

    logits_32, _, state_32 = forward(wide, family, ids)
    logits_ac, loss_ac, state_ac = forward(wide, family, ids, ac)
    narrow_ac, _, narrow_state = forward(narrow, family, ids, ac)
    assert state_32 == torch.float32
    assert state_ac == narrow_state == torch.float32  # the residual stream has the un-widened model's dtype
    assert rel_err(logits_ac, logits_32) <= MODEL_TOL[ac], rel_err(logits_ac, logits_32)
    assert rel_err(logits_ac, narrow_ac) <= MODEL_TOL[ac], rel_err(logits_ac, narrow_ac)

    # training: off the preserving init, loss.backward() after an autocast forward, gradients vs fp32
    perturb_ghc(wide)
    logits, grads = {}, {}
    for dtype in (None, ac):
        wide.zero_grad(set_to_none=True)
        logits[dtype], loss, _ = forward(wide, family, ids, dtype)
        loss.backward()
        grads[dtype] = {k: p.grad.clone() for k, p in wide.named_parameters() if p.grad is not None}
    assert rel_err(logits[ac], logits[None]) <= MODEL_TOL[ac], rel_err(logits[ac], logits[None])
    assert any("vwn_" in k for k in grads[None]) and grads[ac].keys() == grads[None].keys()
    # norm-relative: dL/dread nearly cancels (a pre-norm sublayer is scale invariant, so x . dL/dx ~ 0), and bf16
    # rounding of dL/dx shows there as a few % of a small number (up to 4.3% seen; other parameters below 2.5%)
    for k, g in grads[None].items():
        assert grads[ac][k].dtype == torch.float32
        assert norm_rel_err(grads[ac][k], g) <= GRAD_TOL[ac], (k, norm_rel_err(grads[ac][k], g))


def test_hf_trainer_bf16_trains_a_widened_model(tmp_path):
    """The reported failure: Trainer(bf16=True) on the CPU runs the forward under CPU autocast."""
    from transformers import Trainer, TrainingArguments

    wide = vwn_transform.widen(tiny_hf_model("llama"), 1.5).train()
    before = {k: p.detach().clone() for k, p in wide.named_parameters() if "vwn_ghc" in k}
    ids = torch.randint(3, 96, (8, 7), generator=torch.Generator().manual_seed(1))
    seen = []
    wide.model.norm.register_forward_pre_hook(
        lambda mod, a: seen.append((a[0].dtype, torch.is_autocast_enabled("cpu"))))
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    result = Trainer(model=wide, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids]).train()
    assert seen and all(s == (torch.float32, True) for s in seen), seen  # autocast on, fp32 residual stream
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[k]) for k, p in wide.named_parameters() if k in before)


def test_bf16_model_under_autocast():
    """A model that was ``.to(torch.bfloat16)``: the residual stream stays bf16 as in the un-widened model,
    logits match it, the backward runs."""
    narrow = tiny_hf_model("llama")
    wide = vwn_transform.widen(narrow, 1.5).to(torch.bfloat16)
    narrow = narrow.to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, loss, state = forward(wide, "llama", ids, torch.bfloat16)
    narrow_logits, _, narrow_state = forward(narrow, "llama", ids, torch.bfloat16)
    assert state == narrow_state == torch.bfloat16
    assert rel_err(logits, narrow_logits) <= MODEL_TOL[torch.bfloat16], rel_err(logits, narrow_logits)
    loss.backward()
    ghc = [p for k, p in wide.named_parameters() if ".proj" in k]
    assert ghc and all(p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.isfinite().all()
                       for p in ghc)


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward_outside", "backward_inside"])
def test_recompute_under_autocast(backward_in_autocast):
    """GHC(recompute=True) drops the coefficients and recomputes them in the backward, also under autocast: the
    gradients are the ones the stored coefficients give (the same op computes the same values either way)."""
    from vwn_transform.modules import _Recomputed

    narrow = tiny_hf_model("llama")
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = {}
    for recompute in (False, True):
        wide = vwn_transform.widen(narrow, config=VWNConfig(n=3, m=2, recompute=recompute))
        perturb_ghc(wide)
        dropped = _Recomputed.dropped_bytes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wide(ids, labels=ids).loss
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        assert (_Recomputed.dropped_bytes > dropped) == recompute
        grads[recompute] = {k: p.grad for k, p in wide.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, rtol=1e-6, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------------
class TwoGHC(nn.Module):
    """Embedding -> two dynamic GHCs around linear sublayers -> head: an fp32 state, bf16 sublayer outputs under
    autocast, and a write feeding the next read (what the vwn backend fuses into ghc_write_read_dynamic)."""

    def __init__(self, dim=16, n=3, m=2, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim * n // m)
        self.g1 = GHC(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)), dim, n, m)
        self.g2 = GHC(nn.Linear(dim, dim), dim, n, m)
        self.head = nn.Linear(dim * n // m, vocab)
        perturb_ghc(self)

    def forward(self, ids):
        return self.head(self.g2(self.g1(self.emb(ids))))


def _fwd_bwd(model, call, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(ids)
    out.float().square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend,options,tol", [
    ("aot_eager", None, 1e-6),
    ("vwn", {"inner": "aot_eager"}, 1e-6),
    # inductor may fuse the elementwise ops around the GHC ops and skip a bf16 rounding eager does: a bf16-sized
    # tolerance (torch 2.13 on the CPU: equal outputs, gradients within 4e-7)
    pytest.param("inductor", None, 1e-2, marks=pytest.mark.slow),
], ids=["aot_eager", "vwn", "inductor"])
def test_compiled_matches_eager_under_autocast(backend, options, tol):
    torch._dynamo.reset()
    model = TwoGHC()
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(2))
    out_e, grads_e = _fwd_bwd(model, model, ids)
    assert out_e.dtype == torch.bfloat16
    compiled = torch.compile(model, backend=backend, options=options, fullgraph=True)
    ops.reset_implementations_used()
    out_c, grads_c = _fwd_bwd(model, compiled, ids)
    if backend == "vwn":  # the backend fused g1's write with g2's read, and the fused op ran under autocast
        assert "ghc_write_read_dynamic" in ops.implementations_used()
    assert out_c.dtype == out_e.dtype
    assert rel_err(out_c, out_e) <= tol, rel_err(out_c, out_e)
    for k, g in grads_e.items():
        assert rel_err(grads_c[k], g) <= tol, (k, rel_err(grads_c[k], g))
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------
# CUDA autocast (deselected on the CPU: -m "not gpu")
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("impl_name", ["auto", "reference", "triton"])
@pytest.mark.parametrize("ac", AC_DTYPES, ids=["bf16", "fp16"])
def test_cuda_autocast(impl_name, ac):
    """On CUDA: every op under CUDA autocast vs fp32, and a widened tiny Llama (auto runs the reference at these
    unmeasured sizes, kernels/measured.py)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ops.set_impl(impl_name)
    try:
        for case in CASES:
            leaves = {k: v.cuda() for k, v in make_leaves().items()}
            want, want_g = _run_cuda(case, leaves, None)
            got, got_g = _run_cuda(case, leaves, ac)
            for i, (o, w) in enumerate(zip(got, want)):
                assert o.dtype == torch.float32, (case, i, o.dtype)
                assert rel_err(o, w) <= OP_TOL[ac], (case, i, rel_err(o, w))
            for k, w in want_g.items():
                assert rel_err(got_g[k], w) <= OP_TOL[ac], (case, k, rel_err(got_g[k], w))
        used = set(ops.implementations_used().values())
        assert used == ({"triton"} if impl_name == "triton" else {"reference"}), used

        narrow = tiny_hf_model("llama").cuda()
        wide = vwn_transform.widen(narrow, 1.5)
        ids = torch.randint(3, 96, (2, 7), device="cuda")
        with torch.autocast("cuda", dtype=ac):
            got = wide(ids, labels=ids)
            narrow_logits = narrow(ids).logits.float()
        got.loss.backward()
        want = wide(ids).logits
        assert rel_err(got.logits.float(), want) <= MODEL_TOL[ac]
        assert rel_err(got.logits.float(), narrow_logits) <= MODEL_TOL[ac]
    finally:
        ops.set_impl(None)
        ops.reset_implementations_used()


def _run_cuda(case, leaves, autocast_dtype):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if k in USES[case]}
    g = torch.Generator(device="cuda").manual_seed(7)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        outs = CASES[case](leaves)
        loss = sum((o.float() * torch.randn(o.shape, generator=g, device="cuda")).sum() for o in outs)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads))
