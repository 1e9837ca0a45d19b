"""Time one training step (forward + backward + AdamW) of the head vs the loop oracle; peak memory.

Each (implementation, C) runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.

    .venv/bin/python benchmarks/bench_head_step.py                 # B=64 N=49 F=1280 D=384 M=10, C=7,100,1000
    .venv/bin/python benchmarks/bench_head_step.py --classes 7 100 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_one(impl: str, num_classes: int, steps: int, batch: int, mixing: str, scope: str) -> dict:
    from loop_oracle import oracle_objective

    from protohead import HeadOptimal

    torch.manual_seed(0)
    modes = {} if mixing == "default" else {"mixing": mixing, "attention_scope": scope}
    head = HeadOptimal(num_classes=num_classes, emb_dim=384, num_heads=8, img_feat_dim=1280, num_prototypes=10,
                       max_prototypes=10, **modes)
    head.set_class_counts(torch.randint(5, 500, (num_classes,)))
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3)
    pool, img = torch.randn(batch, 49, 1280), torch.randn(batch, 1280)
    labels = torch.randint(0, num_classes, (batch,))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        if impl == "protohead":
            _, loss, _ = head(pool, img, labels)
        else:
            loss = oracle_objective(head, pool, img, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return {"impl": impl, "C": num_classes, "mixing": head.config.resolved_mixing(),
            "scope": head.config.resolved_attention_scope(), "step_s": statistics.median(times),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[7, 100, 1000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--oracle-max-classes", type=int, default=100,
                        help="skip the oracle above this C (its class-pair loop is C² autograd ops)")
    parser.add_argument("--extra-modes", action="store_true",
                        help="also time sequential mixing (class and full scope) up to --oracle-max-classes")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, c, steps, batch, mixing, scope = args.child
        print(json.dumps(run_one(impl, int(c), int(steps), int(batch), mixing, scope)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.batch} N=49 F=1280 D=384 M=10")
    rows = []
    for c in args.classes:
        jobs = [("protohead", "default", "default")]  # the head's default modes
        if args.extra_modes and c <= args.oracle_max_classes:
            jobs += [("protohead", "sequential", "class"), ("protohead", "sequential", "full")]
        if c <= args.oracle_max_classes:
            jobs.append(("oracle", "default", "default"))
        for impl, mixing, scope in jobs:
            out = subprocess.run([sys.executable, __file__, "--child", impl, str(c), str(args.steps),
                                  str(args.batch), mixing, scope], capture_output=True, text=True)
            if out.returncode:
                print(f"{impl} C={c} {mixing}/{scope}: FAILED\n{out.stderr[-2000:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['impl']:9s} C={c:5d} {row['mixing']:10s} {row['scope']:5s} "
                  f"step {row['step_s']:8.3f} s   peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    for c in args.classes:
        ours = [r for r in rows if r["C"] == c and r["impl"] == "protohead"]
        oracle = [r for r in rows if r["C"] == c and r["impl"] == "oracle"]
        if ours and oracle:
            print(f"C={c}: oracle / protohead = {oracle[0]['step_s'] / ours[0]['step_s']:.1f}x")


if __name__ == "__main__":
    main()
