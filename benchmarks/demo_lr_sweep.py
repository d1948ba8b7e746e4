"""The demo's recipe, checked: a learning-rate sweep of the baseline GPT, then widened twins trained with the
baseline's best learning rate, each model alone on the same batches (the demo trains them interleaved; alone or
interleaved, a model sees the same batches and the same schedule). Prints the baseline's final validation loss per
learning rate and, per widened twin, its final loss, gap and token efficiency against the best baseline.

    python benchmarks/demo_lr_sweep.py                                  # ~10-15 min on 1 CPU thread
    python benchmarks/demo_lr_sweep.py --lrs 2e-3,4e-3 --twins 8:2 --steps 550 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="1e-3,2e-3,3e-3,4e-3", help="peak learning rates of the baseline sweep")
    ap.add_argument("--twins", default="4:2,8:2", help='widened twins as "ratio:m" pairs, e.g. "4:2,8:2" ("": none)')
    ap.add_argument("--twin-lr", type=float, default=None, help="learning rate of the twins (default: the "
                    "baseline's best)")
    ap.add_argument("--steps", type=int, default=550)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every curve to this file")
    args = ap.parse_args(argv)

    from vwn_experiments.shakespeare import (Batches, DemoSettings, base_model, load_corpus, parse_ratio,
                                             token_efficiency, train_models, widened_twin)

    torch.set_num_threads(args.threads)
    settings = DemoSettings(steps=args.steps, seed=args.seed)
    data, _ = load_corpus()
    batches = Batches(data, settings, torch.device("cpu"), total_steps=settings.steps)
    runs = {}

    def train(name, make, lr):
        s = dataclasses.replace(settings, lr=lr)
        t0 = time.perf_counter()
        hist = train_models({name: make()}, s, batches, progress=False)
        runs[name] = {"lr": lr, "tokens": hist["tokens"], "val": hist["val"][name],
                      "seconds": time.perf_counter() - t0}
        print(f"{name}: lr {lr:g}, final val loss {hist['val'][name][-1]:.4f} ({runs[name]['seconds']:.0f} s)",
              flush=True)

    for lr in (float(x) for x in args.lrs.split(",")):
        train(f"baseline lr={lr:g}", lambda: base_model(settings, torch.device("cpu")), lr)
    best = min((r for n, r in runs.items() if n.startswith("baseline")), key=lambda r: r["val"][-1])
    twin_lr = args.twin_lr or best["lr"]
    for pair in filter(None, args.twins.split(",")):
        ratio, m = pair.split(":")
        r = parse_ratio(ratio)
        train(f"r={r} m={m} lr={twin_lr:g}",
              lambda r=r, m=m: widened_twin(base_model(settings, torch.device("cpu")), r, int(m)), twin_lr)
    print(f"\nbest baseline: lr {best['lr']:g}, final val loss {best['val'][-1]:.4f}; {args.steps} steps x "
          f"{settings.tokens_per_step} tokens, seed {args.seed}\n")
    print("| model | lr | final val loss | gap vs best baseline | token efficiency | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        eff = token_efficiency(run["tokens"], best["val"], run["val"])
        gap = run["val"][-1] - best["val"][-1]
        eff_text = "-" if eff is None else f"{eff:.2f}x"
        print(f"| {name} | {run['lr']:g} | {run['val'][-1]:.4f} | {gap:+.4f} | {eff_text} | {run['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
