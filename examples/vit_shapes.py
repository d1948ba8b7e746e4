"""Widen a small Vision Transformer and train it against its baseline on generated images (no downloads).

The image set is drawn here: 16x16 RGB images of six shape classes (filled square, ring, plus, x, horizontal bar,
vertical bar) at random positions, sizes and colours, on noisy backgrounds. A tiny Hugging Face ViT is built, its
twin is widened with ``vwn_transform.widen(vit, ratio, example_inputs={"pixel_values": x})`` (the stream is widened
at the first block's input: ViT's stream starts at patch embeddings, not token tables), and both train with the
same batches, the same optimizer and the same number of steps from the same starting function (the
function-preserving init). The script prints a table of held-out loss and accuracy.

Usage (about a minute on 2 CPU cores)::

    .venv/bin/python examples/vit_shapes.py                  # r=2, 600 steps
    .venv/bin/python examples/vit_shapes.py --ratio 1.5 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import vwn_transform

CLASSES = ["square", "ring", "plus", "x", "horizontal bar", "vertical bar"]


def draw_shapes(count: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [count, 3, size, size] in [0, 1], labels [count])``: one shape per image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (count,), generator=g)
    images = torch.rand(count, 3, size, size, generator=g) * 0.3  # background noise
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")  # [size, size]
    for i in range(count):
        r = int(torch.randint(3, 6, (1,), generator=g))  # half size
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=g))
        dy, dx = ys - cy, xs - cx
        kind = int(labels[i])
        if kind == 0:
            mask = (dy.abs() <= r) & (dx.abs() <= r)
        elif kind == 1:
            dist = (dy.float() ** 2 + dx.float() ** 2).sqrt()
            mask = (dist <= r) & (dist >= r - 1.5)
        elif kind == 2:
            mask = ((dy.abs() <= 1) & (dx.abs() <= r)) | ((dx.abs() <= 1) & (dy.abs() <= r))
        elif kind == 3:
            mask = (((dy - dx).abs() <= 1) | ((dy + dx).abs() <= 1)) & (dy.abs() <= r) & (dx.abs() <= r)
        elif kind == 4:
            mask = (dy.abs() <= 1) & (dx.abs() <= r)
        else:
            mask = (dx.abs() <= 1) & (dy.abs() <= r)
        colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=g)  # [3, 1, 1]
        images[i] = torch.where(mask, colour, images[i])
    return images, labels


def build_vit(seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=128, num_labels=len(CLASSES),
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


@torch.no_grad()
def evaluate(model, images, labels) -> tuple[float, float]:
    model.eval()
    logits = model(pixel_values=images).logits
    model.train()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", default="2", help="VWN ratio r (default 2)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_x, train_y = draw_shapes(args.train_size, seed=args.seed)
    test_x, test_y = draw_shapes(1000, seed=args.seed + 1)
    base = build_vit(args.seed)
    wide = vwn_transform.widen(base, args.ratio, example_inputs={"pixel_values": train_x[:2]})
    models = {"baseline": base.train(), f"VWN r={args.ratio}": wide.train()}
    opts = {k: torch.optim.AdamW(vwn_transform.param_groups(m, 0.05), lr=args.lr) for k, m in models.items()}
    order = torch.Generator().manual_seed(args.seed + 2)
    seconds = dict.fromkeys(models, 0.0)
    for step in range(args.steps):
        idx = torch.randint(0, args.train_size, (args.batch,), generator=order)  # the same batch for both
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * 3.14159)))
        for name, model in models.items():
            start = time.perf_counter()
            for group in opts[name].param_groups:
                group["lr"] = float(lr)
            loss = F.cross_entropy(model(pixel_values=train_x[idx]).logits, train_y[idx])
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - start
        if (step + 1) % max(1, args.steps // 5) == 0:
            report = ", ".join(f"{k} {evaluate(m, test_x, test_y)[1]:.3f}" for k, m in models.items())
            print(f"step {step + 1}/{args.steps}: held-out accuracy {report}", flush=True)

    print(f"\n| model | params | held-out loss | held-out accuracy | train s |\n|---|---:|---:|---:|---:|")
    for name, model in models.items():
        loss, acc = evaluate(model, test_x, test_y)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {loss:.4f} | {acc:.3f} | {seconds[name]:.1f} |")
    print(f"\n{args.steps} steps x {args.batch} images, {len(CLASSES)} classes, {args.train_size} training and 1000 "
          f"held-out images (seed {args.seed}), {args.threads} CPU thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
