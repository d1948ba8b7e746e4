"""benchmarks/gpu_check.py, the one GPU command, checked on the CPU: its parity stage runs every GHC op forward
and backward through the Triton interpreter against the reference and fp64 (so the script a GPU session will run
is known to work before device time is spent), and it refuses to pretend to measure a GPU that is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
OPS = {"read_dynamic", "read_dynamic_bwd", "read_static", "read_static_bwd", "write", "write_bwd",
       "write_read_dynamic", "write_read_dynamic_bwd"}


def run(tmp_path, *args, interpret=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path (on a GPU the script measures)")
def test_smoke_parity_stage_checks_every_op(tmp_path):
    # no --slots: the smoke sizes' parity slots at D = 48 and their unaligned part, (2, 3) at D = 40 (d = 20)
    proc = run(tmp_path, "--smoke", "--only", "env", "--only", "parity")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "parity.json").read_text())["rows"]
    assert {r["op"] for r in rows} == OPS
    assert {(r["dtype"], r["N"]) for r in rows} == {("bfloat16", 1), ("bfloat16", 33), ("float32", 1),
                                                    ("float32", 33)}
    assert {(r["m"], r["n"], r["D"]) for r in rows} == {(2, 3, 48), (1, 4, 48), (2, 3, 40)}
    assert {r["N"] for r in rows if r["D"] == 40} == {33}
    assert all(r["ok"] and r["rel_err"] <= r["limit"] and r["kernel"].startswith("fma-v") for r in rows), rows
    summary = (tmp_path / "summary.md").read_text()
    assert f"parity: {len(rows)}/{len(rows)}" in summary and "CPU (smoke run)" in summary
    assert (tmp_path / "env.log").exists() and not (tmp_path / "kernels.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu_or_the_interpreter(tmp_path):
    proc = run(tmp_path, interpret=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--smoke" in proc.stderr
    proc = run(tmp_path, "--smoke", interpret=False)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "summary.md").exists()


def test_stage_rows_survive_a_stopped_stage_and_timeouts_are_checked(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    gpu_check.Rows.path = str(tmp_path / "parity.partial.json")
    try:
        rows = gpu_check.Rows()
        rows.append(dict(op="write", ok=True))
        rows.append(dict(op="read_static", ok=False))
        assert json.loads((tmp_path / "parity.partial.json").read_text()) == rows  # on disk after every append
    finally:
        gpu_check.Rows.path = None
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", str(tmp_path), "--timeout", "parity=soon"])
    assert exc.value.code == 2 and "expected STAGE=SECONDS" in capsys.readouterr().err


def test_batched_tc_ab_switch():
    """gpu_check checks and times the batched tensor-core kernels beside the per-token ones exactly where the
    per-token ones run, and its switch restores the dispatch afterwards."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from vwn_transform.kernels import triton_common

    every = {"write", "write_bwd", "read_dynamic", "read_dynamic_bwd", "write_read_dynamic", "write_read_dynamic_bwd"}
    assert set(gpu_check._batched_ops(8, 16)) == every and set(gpu_check._batched_ops(3, 12)) == every
    assert set(gpu_check._batched_ops(8, 8)) == {"read_dynamic", "read_dynamic_bwd", "write_read_dynamic",
                                                 "write_read_dynamic_bwd"}  # the FMA write there
    assert gpu_check._batched_ops(8, 64) == ()  # the batched ones run there already
    assert gpu_check._batched_ops(2, 3) == ()  # the FMA kernels
    before = set(triton_common.PER_TOKEN_TC)
    with gpu_check.batched_tc():
        assert triton_common.tc_batched_tokens(16) == 8
    assert triton_common.PER_TOKEN_TC == before and triton_common.tc_batched_tokens(16) == 1
