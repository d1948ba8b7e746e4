"""Graph breaks under torch.compile: each Hugging Face family, original vs widened, in the setups training code
uses: ``config.use_cache`` True/False x ``gradient_checkpointing_enable()`` off/on x train/eval mode.

Counted with ``torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count`` (Dynamo only: what
``torch.compile`` with any backend, ``vwn`` and inductor included, captures), on the tiny configs of
``vwn_transform.models.hf_tiny`` widened at r=1.5. The target is "no more breaks than the original model": some
HF models break by themselves (a ``logger.warning_once`` in traced code is a graph break).

Prints one line per family, ``<setup>:<original>/<widened>`` per setup, where the setup is three letters:
``u``/``U`` use_cache False/True, ``g``/``G`` gradient checkpointing off/on, ``e``/``T`` eval/train mode.

Usage::

    .venv/bin/python benchmarks/graph_breaks.py                    # every family the README lists (~15 min)
    .venv/bin/python benchmarks/graph_breaks.py llama gpt2 --attn sdpa
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import torch

import vwn_transform
from vwn_transform.models.hf_tiny import tiny_hf_model

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gemma", "phi3", "gpt_neox", "mixtral", "qwen3", "phi", "opt",
            "olmo2", "gemma2", "gemma3_text", "stablelm", "qwen2_moe", "granite", "starcoder2", "gptj", "codegen",
            "falcon", "olmoe", "cohere", "gpt_bigcode", "qwen3_moe"]
SETUPS = [(uc, gc, train) for uc in (False, True) for gc in (False, True) for train in (False, True)]


def graph_breaks(model, ids, use_cache: bool, gc: bool, train: bool) -> int | str:
    model = copy.deepcopy(model)
    model.config.use_cache = use_cache
    if gc:
        model.gradient_checkpointing_enable()
    model.train(train)
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count
    except Exception as exc:  # reported in the table, not fatal
        return f"error ({type(exc).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("families", nargs="*", default=FAMILIES)
    ap.add_argument("--attn", default="eager", help="attention implementation (eager, sdpa)")
    ap.add_argument("--ratio", default="3/2")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    print("setup: u/U use_cache False/True, g/G gradient checkpointing off/on, e/T eval/train; original/widened")
    for family in args.families:
        start = time.perf_counter()
        base = tiny_hf_model(family)
        base.config._attn_implementation = args.attn
        wide = vwn_transform.widen(base, args.ratio)
        cells = []
        for uc, gc, train in SETUPS:
            counts = [graph_breaks(m, ids, uc, gc, train) for m in (base, wide)]
            cells.append(f"{'U' if uc else 'u'}{'G' if gc else 'g'}{'T' if train else 'e'}:{counts[0]}/{counts[1]}")
        print(f"{family:12s} {' '.join(cells)}   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
