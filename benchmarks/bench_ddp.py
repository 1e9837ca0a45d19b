"""Wall time of one fixed small training job: 1 process vs torchrun with 2 processes (gloo, CPU).

    .venv/bin/python benchmarks/bench_ddp.py [--data ../shared/data/ham10000] [key=value ...]

Both use the machine's cores: the single process gets all torch threads, each of the 2 processes half.
The feature cache is filled first, so only training is timed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = ["subset_per_class=60", "epochs=3", "batch_size=64", "head.emb_dim=128", "push_every=1", "expand_every=1",
       "progress=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    job = [*JOB, *args.overrides]
    with tempfile.TemporaryDirectory() as scratch:
        base = ["-m", "protohead", "train", "--data", args.data, *job]
        subprocess.run([sys.executable, "-m", "protohead", "extract", "--data", args.data, *job], check=True,
                       capture_output=True)
        times = {}
        for name, launcher, threads in (
            ("1 process", [sys.executable], cores),
            ("2 processes (torchrun, gloo)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node=2"], max(1, cores // 2)),
        ):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            started = time.perf_counter()
            subprocess.run([*launcher, *base, "--out", f"{scratch}/{len(times)}"], check=True, env=env,
                           capture_output=True)
            times[name] = time.perf_counter() - started
            print(f"{name:32s} {times[name]:7.1f} s", flush=True)
    first, second = times.values()
    print(f"speed-up 2 vs 1 process: {first / second:.2f}x (job: {' '.join(job)})")


if __name__ == "__main__":
    main()
