"""Train a widened model with PyTorch's own distributed engine: DDP or FSDP2 (``fully_shard`` per block, then the
root), optionally with activation checkpointing of every block.

One machine, two processes on the CPU (gloo)::

    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode fsdp
    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode ddp --checkpointing

Several machines (run on each node; rank 0's address as the rendezvous endpoint, NCCL on GPUs)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
        examples/train_fsdp.py --mode fsdp --device cuda

Without torchrun it trains in one process on the whole global batch; the distributed runs compute the same
losses and parameters (the test suite checks this to 1e-5). Each rank takes an equal slice of the same global
batch; gradients are averaged across ranks, which equals the single-process gradient of the global mean loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import vwn_transform


def build(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        from vwn_transform.models import GPT, GPTConfig

        base = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    else:
        from vwn_transform.models.hf_tiny import tiny_hf_model

        base = tiny_hf_model(args.model, vocab_size=256)
    return vwn_transform.widen(base, args.ratio, m=args.m).train()


def loss_of(model, ids: torch.Tensor, hf: bool) -> torch.Tensor:
    if hf:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return model(ids[:, :-1], ids[:, 1:])[1]


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
        out[name.replace("module.", "", 1) if name.startswith("module.") else name] = t.detach().cpu().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp", help="used when launched by torchrun")
    ap.add_argument("--model", default="llama", help="gpt, or a transformers model type (tiny config)")
    ap.add_argument("--ratio", default="2")
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split across ranks)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpointing", action="store_true", help="recompute each block's activations in backward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write {losses, params} here (rank 0)")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.batch % world:
            raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")

    model = build(args).to(device)
    hf = args.model != "gpt"
    blocks = [model.get_submodule(name) for name in model.vwn_recipe["wrapped"]["blocks"]]
    if args.checkpointing:
        from torch.distributed._composable import checkpoint  # in place: module names stay as they are

        for block in blocks:
            checkpoint(block)
    if distributed and args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(vwn_transform.param_groups(model, weight_decay=0.1), lr=args.lr)

    gen = torch.Generator().manual_seed(args.seed + 1)
    per_rank = args.batch // world
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, 256, (args.batch, args.seq + (0 if hf else 1)), generator=gen)  # same on all ranks
        local = batch[rank * per_rank:(rank + 1) * per_rank].to(device)  # [B/world, T]
        loss = loss_of(model, local, hf)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if distributed:
            dist.all_reduce(value, op=dist.ReduceOp.AVG if args.device == "cuda" else dist.ReduceOp.SUM)
            if args.device != "cuda":
                value /= world  # gloo has no AVG
        losses.append(float(value))
        if rank == 0:
            print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.6f}", flush=True)
    params = full_params(model)
    if rank == 0:
        mode = args.mode if distributed else "single process"
        print(f"{mode}, {world} process(es), {time.perf_counter() - start:.1f} s", flush=True)
        if args.out:
            torch.save({"losses": losses, "params": params}, args.out)
    if distributed:
        dist.barrier()
        if dist.get_backend() == "gloo":
            # torch's ProcessGroupGloo destructor joins its worker threads while holding the GIL; a worker still
            # releasing the last collective's tensors needs the GIL, so destroy_process_group() occasionally
            # deadlocks (seen once in CI here; pytorch/pytorch#56297, #75097). Everything is written and every
            # rank passed the barrier: leave without the teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
