"""Issue-3 figures: head presets vs linear baselines on frozen Lite0 features of the official split.

Same features, same seed, each model selected on validation balanced accuracy, scored once on test.
The two linear heads of the issue are run as defined there (no post-hoc shift); ``linear_posthoc`` is the
linear head with the same validation-chosen post-hoc logit adjustment the presets get by default.

    .venv/bin/python benchmarks/ham_figures.py --out /tmp/ham-figures [--models basic linear ...] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from protohead.pipeline import run
from protohead.runconfig import load_run_config

ROWS = {  # row name → run-config overrides
    "linear": ["model=linear", "posthoc_tau=0"],
    "linear_la": ["model=linear_la", "posthoc_tau=0"],
    "linear_posthoc": ["model=linear"],
    "basic": ["model=basic"],
    "long_tail": ["model=long_tail"],
    "uncertainty": ["model=uncertainty"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        config = load_run_config(overrides=["progress=false", *ROWS[model], *args.overrides])
        started = time.perf_counter()
        metrics = run(config, args.out / model, overwrite=True)
        history = json.loads((args.out / model / "history.json").read_text())
        rows.append((model, metrics, time.perf_counter() - started, history["best"]))
        print(f"{model:12s} acc {metrics['accuracy']:.4f} bal {metrics['balanced_accuracy']:.4f} "
              f"f1 {metrics['macro_f1']:.4f} auroc {metrics['macro_auroc']:.4f} ece {metrics['ece']:.4f} "
              f"aurc {metrics['aurc']:.4f} best-epoch {history['best']['epoch'] + 1} τ {metrics['posthoc_tau']:g} "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    lines = ["| model | accuracy | balanced acc. | macro-F1 | macro AUROC | ECE | AURC | best epoch (val) | post-hoc τ "
             "(val) | val acc. / bal. acc. | time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, m, seconds, best in rows:
        lines.append(f"| {model} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | {m['macro_f1']:.3f} | "
                     f"{m['macro_auroc']:.3f} | {m['ece']:.3f} | {m['aurc']:.3f} | {best['epoch'] + 1} | "
                     f"{m['posthoc_tau']:g} | {best['val_accuracy']:.3f} / {best['val_balanced_accuracy']:.3f} | "
                     f"{seconds:.0f} s |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
