"""Time one training step (forward + backward + AdamW) of the head, the patch-scored head, a linear head and
the loop oracle; peak memory.

Each (implementation, C) runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own. Per C
one run prints:

- ``head``: :class:`protohead.HeadOptimal` with its default modes (parallel mixing, cosine, 3-way gate);
- ``head@REF`` (with ``--baseline REF``): the same head from the package as committed at git revision REF
  (extracted read-only with ``git archive`` into a temporary folder), for a before/after figure side by side;
- ``patch``: the patch-scored preset's scoring (``scoring="patch", use_attention=False,
  patch_pooling="soft"``), the rest of the configuration default;
- ``linear``: LayerNorm + Linear on the pooled vector (B, F) with cross-entropy, the cheapest useful head;
- ``oracle`` (C ≤ ``--oracle-max-classes``): ``loop_oracle.py``, the objective computed the plain way;
- ``head bf16``, ``patch bf16`` (with ``--amp-cpu``): the same steps under CPU bfloat16 autocast (``amp_cpu=true``
  in a run; fast where the CPU has AVX512-BF16 / AMX), parameters and optimiser in float32.

and a table with each step time as a multiple of the linear head's and the oracle's time over each.

    .venv/bin/python benchmarks/bench_head_step.py                 # B=64 N=49 F=1280 D=384 M=10, C=7,100,1000
    .venv/bin/python benchmarks/bench_head_step.py --classes 7 100 1000 --steps 3 --baseline HEAD
    .venv/bin/python benchmarks/bench_head_step.py --classes 100 --threads 1   # less noise on a busy machine
    .venv/bin/python benchmarks/bench_head_step.py --classes 7 100 --amp-cpu    # + bfloat16 autocast rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EMB_DIM, HEADS, FEATURES, TOKENS, SLOTS = 384, 8, 1280, 49, 10
PATCH = {"scoring": "patch", "use_attention": False, "patch_pooling": "soft"}


def run_one(spec: dict) -> dict:
    """One configuration in this process: median step time over ``steps`` steps after one warm-up step."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    num_classes, batch = spec["C"], spec["batch"]
    torch.manual_seed(0)
    pool, img = torch.randn(batch, TOKENS, FEATURES), torch.randn(batch, FEATURES)
    labels = torch.randint(0, num_classes, (batch,))
    row = {"name": spec["name"], "C": num_classes}
    if spec["impl"] == "linear":
        model = torch.nn.Sequential(torch.nn.LayerNorm(FEATURES), torch.nn.Linear(FEATURES, num_classes))

        def objective() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(img), labels)
    else:
        import protohead
        from protohead import HeadOptimal

        row["package"] = str(Path(protohead.__file__).parent)
        model = HeadOptimal(num_classes=num_classes, emb_dim=EMB_DIM, num_heads=HEADS, img_feat_dim=FEATURES,
                            num_prototypes=SLOTS, max_prototypes=SLOTS, **spec.get("options", {}))
        model.set_class_counts(torch.randint(5, 500, (num_classes,)))
        config = model.config
        row["modes"] = (f"patch/{config.patch_pooling}" if config.scoring == "patch" else
                        f"{config.resolved_mixing()}/{config.resolved_attention_scope()}")
        if spec["impl"] == "oracle":
            from loop_oracle import oracle_objective

            def objective() -> torch.Tensor:
                return oracle_objective(model, pool, img, labels)
        else:
            def objective() -> torch.Tensor:
                return model(pool, img, labels)[1]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for step in range(spec["steps"] + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("amp", False)):
            loss = objective()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    row.update(step_s=statistics.median(times), threads=torch.get_num_threads(),
               peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return row


def extract_revision(revision: str, into: Path) -> Path:
    """``src/protohead`` as committed at ``revision`` (read-only ``git archive``) → the folder to put on the path."""
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", revision, "src/protohead"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def jobs_for(num_classes: int, args: argparse.Namespace) -> list[dict]:
    jobs = [{"name": "head", "impl": "head"}]
    if args.baseline:
        jobs.append({"name": f"head@{args.baseline}", "impl": "head", "baseline": True})
    jobs.append({"name": "patch", "impl": "head", "options": PATCH})
    if args.amp_cpu:
        jobs += [{"name": "head bf16", "impl": "head", "amp": True},
                 {"name": "patch bf16", "impl": "head", "options": PATCH, "amp": True}]
    jobs.append({"name": "linear", "impl": "linear"})
    if args.extra_modes and num_classes <= args.oracle_max_classes:
        jobs += [{"name": f"head {mixing}/{scope}", "impl": "head",
                  "options": {"mixing": mixing, "attention_scope": scope}}
                 for mixing, scope in (("sequential", "class"), ("sequential", "full"))]
    if num_classes <= args.oracle_max_classes:
        jobs.append({"name": "oracle", "impl": "oracle"})
    for job in jobs:
        job.update(C=num_classes, steps=args.steps, batch=args.batch, threads=args.threads)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[7, 100, 1000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time the default head as committed at this git revision (e.g. HEAD)")
    parser.add_argument("--oracle-max-classes", type=int, default=100,
                        help="skip the oracle above this C (its class-pair loop is C² autograd ops)")
    parser.add_argument("--extra-modes", action="store_true",
                        help="also time sequential mixing (class and full scope) up to --oracle-max-classes")
    parser.add_argument("--amp-cpu", action="store_true",
                        help="also time the head and the patch head under CPU bfloat16 autocast (amp_cpu=true)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, threads {threads}, B={args.batch} N={TOKENS} F={FEATURES} D={EMB_DIM} "
          f"M={SLOTS}, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        baseline_path = extract_revision(args.baseline, Path(scratch)) if args.baseline else None
        for num_classes in args.classes:
            for job in jobs_for(num_classes, args):
                env = dict(os.environ)
                if job.get("baseline"):
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline_path), env.get("PYTHONPATH")]))
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                                     text=True, env=env)
                if out.returncode:
                    print(f"{job['name']} C={num_classes}: FAILED\n{out.stderr[-2000:]}", flush=True)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                if job.get("baseline") and not row["package"].startswith(str(baseline_path)):
                    raise RuntimeError(f"the baseline run imported {row['package']}, not the extracted revision")
                rows.append(row)
                print(f"{row['name']:26s} C={num_classes:5d} {row.get('modes', ''):15s} step {row['step_s']:8.3f} s   "
                      f"peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print(f"{'C':>5s}  {'implementation':26s} {'step (s)':>9s} {'peak RSS':>9s} {'× linear':>9s} {'oracle ÷':>9s}")
    for num_classes in args.classes:
        here = [r for r in rows if r["C"] == num_classes]
        linear = next((r["step_s"] for r in here if r["name"] == "linear"), None)
        oracle = next((r["step_s"] for r in here if r["name"] == "oracle"), None)
        for row in here:
            times_linear = f"{row['step_s'] / linear:8.1f}×" if linear else f"{'—':>9s}"
            oracle_over = f"{oracle / row['step_s']:8.1f}×" if oracle else f"{'—':>9s}"
            print(f"{num_classes:5d}  {row['name']:26s} {row['step_s']:9.3f} {row['peak_rss_gb']:8.2f}G "
                  f"{times_linear} {oracle_over}")
        ours = next((r["step_s"] for r in here if r["name"] == "head"), None)
        before = next((r["step_s"] for r in here if r["name"].startswith("head@")), None)
        if ours and before:
            print(f"{'':5s}  head now / head@{args.baseline} = {ours / before:.2f}")


if __name__ == "__main__":
    main()
