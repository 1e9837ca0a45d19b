"""C = 1000 training step with and without class-chunked activation checkpointing (one process per setting).

    .venv/bin/python benchmarks/bench_chunking.py                      # chunk slots 2048 (default) and 10**6
    .venv/bin/python benchmarks/bench_chunking.py --chunk-slots 512 2048

Prints the time of 3 steps (forward + backward + AdamW, the first includes warm-up) and peak RSS for each.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run_one(num_classes: int, chunk_slots: int) -> dict:
    from protohead import HeadOptimal

    torch.manual_seed(0)
    head = HeadOptimal(num_classes=num_classes, emb_dim=384, num_heads=8, img_feat_dim=1280, num_prototypes=10,
                       max_prototypes=10, checkpoint_chunk_slots=chunk_slots)
    head.set_class_counts(torch.randint(5, 500, (num_classes,)))
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3)
    pool, img = torch.randn(64, 49, 1280), torch.randn(64, 1280)
    labels = torch.randint(0, num_classes, (64,))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        _, loss, _ = head(pool, img, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        times.append(round(time.perf_counter() - start, 2))
    return {"C": num_classes, "chunk_slots": chunk_slots, "step_s": times,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk-slots", type=int, nargs="+", default=[2048, 10**6])
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    for slots in args.chunk_slots:
        out = subprocess.run([sys.executable, __file__, "--child", str(args.classes), str(slots)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
