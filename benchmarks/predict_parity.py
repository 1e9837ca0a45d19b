"""``load_run(RUN).predict`` on every test image vs the run's own ``predictions_test.npz`` (issue 12 goal).

    python benchmarks/predict_parity.py RUN_DIR [--export RUN_DIR/export/model.onnx ...]

Prints the largest absolute differences of probabilities and uncertainty, class agreement, and the time
per image (backbone on the decoded JPEG + head + post-hoc τ), on the run's own test split. With ``--export``,
each exported file (``protohead export``) is run on the same images and compared the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from protohead import runfolder
from protohead.pipeline import load_data
from protohead.predict import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--export", type=Path, nargs="*", default=[], help="exported models to compare too")
    args = parser.parse_args()
    saved = np.load(args.run_dir / "predictions_test.npz")
    test = load_data(runfolder.read_config(args.run_dir)).splits["test"]
    assert tuple(saved["ids"]) == test.ids, "the run's test ids differ from the data's"
    started = time.perf_counter()
    predictor = load_run(args.run_dir)
    loaded = time.perf_counter()
    predictions = predictor.predict(list(test.sources))
    done = time.perf_counter()
    probs = np.array([[p.probabilities[c] for c in predictor.class_names] for p in predictions])
    uncertainty = np.array([p.uncertainty for p in predictions])
    result = {
        "images": len(predictions),
        "max_abs_diff_probabilities": float(np.abs(probs - saved["probabilities"]).max()),
        "max_abs_diff_uncertainty": float(np.abs(uncertainty - saved["uncertainty"]).max()),
        "same_class": float((probs.argmax(1) == saved["probabilities"].argmax(1)).mean()),
        "load_s": loaded - started,
        "predict_s_per_image": (done - loaded) / len(predictions),
    }
    for path in args.export:
        from protohead.export import load_exported
        from protohead.predict import read_image

        run = load_exported(path)
        logits = np.concatenate([run(predictor.backbone.preprocess([read_image(s) for s in test.sources[i:i + 64]])
                                     .numpy()) for i in range(0, len(test), 64)])
        exported = np.exp(logits - logits.max(1, keepdims=True))
        exported /= exported.sum(1, keepdims=True)
        result[f"export {path.name}"] = {"max_abs_diff_probabilities": float(np.abs(exported - saved["probabilities"])
                                                                             .max()),
                                         "same_class": float((exported.argmax(1) == saved["probabilities"].argmax(1))
                                                             .mean())}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
