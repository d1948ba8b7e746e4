"""Training-step time of the demo's twin models at different CPU thread counts, printed as a Markdown table.

What `vwn demo` / `vwn study` should use by default (issue 12: `vwn study --quick` took 36.9 s with torch's
default threads and 11.8 s with OMP_NUM_THREADS=1 on the 2-core machine). One measured unit is one interleaved
demo step: the baseline GPT's step, then its widened twin's (forward + backward + clip + AdamW), exactly as
``vwn_experiments.train_models`` runs them. Thread counts are interleaved too (round-robin, order rotated
each round), so machine noise hits every setting alike; the table gives the median per setting and its ratio to
the 1-thread median.

Usage::

    .venv/bin/python benchmarks/demo_threads.py             # the demo's default and --quick models
    .venv/bin/python benchmarks/demo_threads.py --rounds 3  # fewer rounds
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import torch

from vwn_experiments import Batches, DemoSettings, base_model, make_optimizer, widened_twin


def one_step(models, opts, batches, step):
    x, y = batches.train_batch(step % batches.settings.steps)
    for name, model in models.items():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)


def measure(preset: str, settings: DemoSettings, threads: list[int], rounds: int, steps: int) -> list[str]:
    data = torch.randint(0, 256, (200_000,), dtype=torch.uint8)  # [bytes]; the timing does not depend on text
    batches = Batches(data, settings, torch.device("cpu"))
    base = base_model(settings, torch.device("cpu"))
    models = {"baseline": base, "widened": widened_twin(base, "4", 2)}
    opts = {n: make_optimizer(m, settings) for n, m in models.items()}
    times: dict[int, list[float]] = {t: [] for t in threads}
    for t in threads:  # warm-up per setting
        torch.set_num_threads(t)
        one_step(models, opts, batches, 0)
    for r in range(rounds):
        order = threads[r % len(threads):] + threads[:r % len(threads)]
        for t in order:
            torch.set_num_threads(t)
            start = time.perf_counter()
            for s in range(steps):
                one_step(models, opts, batches, s)
            times[t].append((time.perf_counter() - start) / steps)
    ref = statistics.median(times[threads[0]])
    rows = []
    for t in threads:
        med = statistics.median(times[t])
        rows.append(f"| {preset} | {t} | {med * 1e3:.1f} | {med / ref:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per measurement")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default 1..cores)")
    args = parser.parse_args()
    logging.getLogger("vwn_transform").setLevel(logging.ERROR)
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, cores + 1))
    print(f"# demo twin step time vs threads ({platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.steps} steps)\n")
    print("| preset | threads | ms per twin step (median) | vs 1 thread |")
    print("|---|---:|---:|---:|")
    for preset, settings in (("default", DemoSettings()), ("--quick", DemoSettings.quick())):
        for row in measure(preset, settings, threads, args.rounds, args.steps):
            print(row, flush=True)


if __name__ == "__main__":
    main()
