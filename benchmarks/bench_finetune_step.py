"""Time one fine-tuning training step in float32 and under CPU bfloat16 autocast (``amp_cpu=true``), side by side.

The step is the trainer's: the trainable part of Lite0 (its last ``--blocks`` blocks and head conv on cached 7 × 7
front maps, or with ``--blocks 0`` the whole backbone on images at ``--image-size``), the head's scores and
objective, backward and AdamW — with the backbone's forward inside the autocast region, as
:meth:`protohead.training.loop.Trainer.train_epoch` runs it. Inputs are random (timing does not depend on the
values); each configuration is built once and the configurations take turns step by step, so a busy machine
slows them alike. Prints the median step time of each and the float32 ÷ bfloat16 ratio per head.

    .venv/bin/python benchmarks/bench_finetune_step.py                       # last block, patch and linear heads
    .venv/bin/python benchmarks/bench_finetune_step.py --blocks 0 --steps 3  # whole backbone at 160 px
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from protohead.backbones import build_backbone, train_backbone
from protohead.device import autocast, cpu_has_fast_bfloat16
from protohead.model import EndToEnd, build_model
from protohead.runconfig import RunConfig

CLASS_COUNTS = [228, 359, 769, 80, 779, 4693, 99]  # HAM10000's official training split


def build(preset: str, blocks: int, image_size: int) -> EndToEnd:
    backbone = train_backbone(build_backbone("efficientnet_lite0", image_size), blocks)
    head = build_model(RunConfig(preset=preset), len(CLASS_COUNTS), backbone.feature_dim, CLASS_COUNTS)
    return EndToEnd(backbone, head).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1, help="trainable tail blocks (0: the whole backbone)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size (default 224 for partial fine-tuning, 160 for the whole backbone)")
    parser.add_argument("--presets", nargs="+", default=["patch", "linear"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image_size = args.image_size or (224 if args.blocks else 160)
    torch.manual_seed(0)
    models = {preset: build(preset, args.blocks, image_size) for preset in args.presets}
    backbone = next(iter(models.values())).backbone
    if args.blocks:
        side = image_size // 32
        channels = backbone.front(args.blocks).feature_dim
        inputs = torch.randn(args.batch, side * side, channels)
    else:
        inputs = torch.randn(args.batch, 3, image_size, image_size)
    labels = torch.randint(0, len(CLASS_COUNTS), (args.batch,))
    optimisers = {preset: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                  for preset, model in models.items()}
    cpu = torch.device("cpu")

    def step(preset: str, amp: bool) -> float:
        model, optimiser = models[preset], optimisers[preset]
        start = time.perf_counter()
        with autocast(cpu, False, cpu=amp):
            tokens, pooled = (model.backbone.tail(inputs, args.blocks) if args.blocks else model.backbone(inputs))
            scores, _ = model.score(tokens, pooled, labels)
            loss, _ = model.objective(scores, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return time.perf_counter() - start

    configs = [(preset, amp) for preset in args.presets for amp in (False, True)]
    times: dict[tuple[str, bool], list[float]] = {config: [] for config in configs}
    for config in configs:  # warm-up: allocators, oneDNN kernels
        step(*config)
    for _ in range(args.steps):
        for config in configs:
            times[config].append(step(*config))
    what = f"last {args.blocks} block(s) + head conv on 7 × 7 maps" if args.blocks else "whole backbone"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {what}, input {image_size} px, "
          f"B = {args.batch}, CPU bfloat16 native: {cpu_has_fast_bfloat16()}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'head':10s} {'float32 (s)':>12s} {'bfloat16 (s)':>13s} {'ratio':>7s}")
    for preset in args.presets:
        full, half = (statistics.median(times[(preset, amp)]) for amp in (False, True))
        print(f"{preset:10s} {full:12.3f} {half:13.3f} {full / half:6.2f}×")


if __name__ == "__main__":
    main()
