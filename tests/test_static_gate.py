"""The static gate (benchmarks/kernel_static_check.py), CI subset: kernels compiled for sm_90a on the CPU and read
with the wheel's ptxas. It must fail on a kernel known to spill (the FMA dynamic read forward at (8, 8), whose 192
per-token gate values do not fit in registers, which is why the dispatcher runs the tensor-core one there) and
pass on what the dispatcher runs at (2, 3) (the FMA kernels) and (8, 64) (the tensor-core kernels, with
tensor-core instructions); plus the parsing of ptxas output and PTX on fixed text. About a minute with a cold
Triton cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_static_check.py")

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
needs_ptxas = pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton wheel bundles no ptxas")


def run_gate(tmp_path, *args):
    out = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc, rows


@needs_ptxas
def test_gate_fails_on_the_spilling_kernel(tmp_path):
    proc, rows = run_gate(tmp_path, "--kernels", "all", "--only", "read_dynamic_fwd[fma-v2]", "--slots", "8,8",
                          "--D", "2048", "--dtype", "bf16")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(rows) == 1, rows
    row = rows[0]
    assert {"kernel", "m", "n", "D", "dtype", "registers", "spill_bytes", "smem_bytes",
            "mma_instructions"} <= set(row)
    assert (row["m"], row["n"], row["D"], row["dtype"]) == (8, 8, 2048, "bf16")
    assert row["spill_bytes"] > 0 and row["registers"] >= 200, row
    assert row["mma_instructions"] == 0  # the FMA kernels have no tl.dot
    assert "| FAIL |" in proc.stdout


@needs_ptxas
def test_gate_passes_on_the_dispatched_kernels(tmp_path):
    proc, rows = run_gate(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = {r["kernel"] for r in rows}
    assert {"write_fwd[fma-v1,dynamic]", "write_bwd[fma-v1,dynamic]", "write_fwd[fma-v1,static]",
            "write_bwd[fma-v1,static]", "read_static_fwd[fma-v1]", "read_static_bwd[fma-v1]",
            "read_dynamic_fwd[fma-v2]", "read_dynamic_bwd_coef[fma-v2]", "read_dynamic_bwd_state[fma-v2]"} <= kernels, \
        kernels
    # at (8, 64) the write and the dynamic read run the batched forwards ("tc-v2") and the tc-v1 backwards
    tc = {"write_fwd_batched[dynamic][tc-v2]", "write_bwd[dynamic][tc-v1]", "write_fwd_batched[static][tc-v2]",
          "write_bwd[static][tc-v1]", "read_static_fwd[tc-v1]", "read_static_bwd[tc-v1]",
          "read_dynamic_bwd_coef[tc-v1]", "read_dynamic_bwd_dh[tc-v1]", "read_dynamic_bwd_dwg[tc-v1]",
          "read_dynamic_fwd_batched[tc-v2]"}
    assert tc <= kernels and not {"read_dynamic_fwd[tc-v1]", "write_fwd[dynamic][tc-v1]"} & kernels, kernels
    assert {(r["m"], r["n"]) for r in rows} == {(2, 3), (8, 64)}
    for r in rows:
        assert r["error"] is None and r["spill_bytes"] == 0 and r["spill_loads"] == 0, r
        assert r["smem_bytes"] <= 100 * 1024 and 0 < r["registers"] <= 255, r
        if "[fma" in r["kernel"]:
            assert (r["m"], r["n"]) != (8, 64) and r["mma_instructions"] == 0, r
            per_thread = r["constexprs"]["BT"] * r["constexprs"]["BD"] // (32 * r["num_warps"])
            if per_thread >= 8:  # a thread holding 8 bf16 values of a row loads them as one 16-byte access
                assert r["v4_loads"] > 0, r
        else:  # the tensor-core kernels run every product on tensor cores (except dL/dRead's tiny one in coef)
            assert r["kernel"] in tc and (r["m"], r["n"]) == (8, 64) and r["mma_instructions"] > 0, r


@needs_ptxas
def test_gate_passes_at_an_unaligned_slot_width(tmp_path):
    # D = 2040: d = 1020 at (2, 3) and 680 at (3, 12), not multiples of 16, so Triton compiles scalar loads; with the
    # chunks of an aligned width the FMA write backward spilled at (2, 3) and the tensor-core write backward and
    # dynamic read forward at (3, 12) (benchmarks/NOTES.md, "Unaligned slot widths")
    proc, rows = run_gate(tmp_path, "--slots", "2,3;3,12", "--D", "2040", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = {(r["m"], r["n"]): set() for r in rows}
    for r in rows:
        kernels[(r["m"], r["n"])].add(r["kernel"])
        assert r["error"] is None and r["spill_bytes"] == 0 and r["spill_loads"] == 0, r
        assert r["smem_bytes"] <= 100 * 1024, r
    assert {"write_bwd[fma-v1,dynamic]", "write_bwd[fma-v1,static]", "read_static_bwd[fma-v1]"} <= kernels[(2, 3)]
    assert {"write_bwd[dynamic][tc-v1]", "write_bwd[static][tc-v1]", "read_dynamic_fwd[tc-v1]"} <= kernels[(3, 12)]
    # the launches differ from the aligned ones where those spill
    from vwn_transform.kernels import triton_tc, triton_write_fma

    assert triton_write_fma.bwd_config(3, 2, 1020)["BD"] < triton_write_fma.bwd_config(3, 2, 1024)["BD"]
    assert triton_tc.configs(12, 3, 680)["dynamic_fwd"]["BD"] < triton_tc.configs(12, 3, 688)["dynamic_fwd"]["BD"]


@pytest.mark.parametrize("args,message", [(["--slots", "0,3"], "(m, n) = (0, 3): the kernels cover 1 <= m <= 16"),
                                          (["--slots", "2,65"], "1 <= n <= 64"),
                                          (["--slots", "3"], "'3': expected two integers 'm,n'"),
                                          (["--D", "4", "--slots", "8,64"], "--D 4 is narrower than m = 8")])
def test_gate_refuses_bad_shapes(tmp_path, args, message):
    proc, rows = run_gate(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr and not rows, proc.stderr


def test_every_tensor_core_kernel_has_a_launch_at_every_alignment():
    # LAUNCH holds None where no candidate compiled without spills; the other form of that kernel must run there
    from vwn_transform.kernels import triton_tc

    assert {(np_, bf16, al) for np_ in (16, 32, 64) for bf16 in (True, False) for al in (True, False)} \
        == set(triton_tc.LAUNCH)
    for (np_, bf16, al), table in triton_tc.LAUNCH.items():
        assert set(table) == set(triton_tc.LAUNCH_KEYS), (np_, bf16, al)
        d = 256 if al else 255
        for key in (k for k in table if not k.endswith("_batched")):
            for batched in (True, False):  # tc-v2 and tc-v1 dispatch
                tokens = triton_tc._tokens(key, np_, d, bf16, batched)
                chosen = table[f"{key}_batched"] if tokens > 1 else table[key]
                assert chosen is not None, (np_, bf16, al, key, batched)
                assert triton_tc.launch_allowed(np_, f"{key}_batched" if tokens > 1 else key, *chosen)


def test_ptxas_and_ptx_parsing():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import kernel_static_check as gate
    finally:
        sys.path.pop(0)
    text = ("ptxas info    : Compiling entry function '_write_fwd' for 'sm_90a'\n"
            "ptxas info    : Function properties for _write_fwd\n"
            "    312 bytes stack frame, 304 bytes spill stores, 300 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 312 bytes cumulative stack size\n")
    assert gate.parse_ptxas(text) == dict(registers=255, spill_stores=304, spill_loads=300)
    with pytest.raises(ValueError):
        gate.parse_ptxas("ptxas fatal   : Unresolved extern function")
    ptx = ("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, ...;\n"
           "\t@%p3 wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n"
           "\tfma.rn.f32 %f5, %f6, %f7, %f8;\n// mma.sync in a comment\n")
    assert gate.count_mma(ptx) == 2
