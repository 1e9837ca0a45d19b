"""``protohead compare --quick`` end to end on a small real subset."""

from __future__ import annotations

import json
import math

from protohead.cli.main import main as cli
from protohead.compare import beyond_noise, columns, goal_line, tail_classes, verdict

SMALL = ["subset_per_class=8", "epochs=1", "head.emb_dim=32", "head.num_heads=4", "batch_size=16", "progress=false"]


def test_quick_comparison_end_to_end_and_resumable(ham10000_root, feature_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--data", str(ham10000_root), "--out", str(out), f"cache_dir={feature_cache}",
            *SMALL]
    assert cli(args) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["columns"]) == columns()
    for name, row in summary["columns"].items():
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "tail_recall", "ece", "aurc", "train_s"):
            assert math.isfinite(row[key]["mean"]), (name, key)
    table = (out / "comparison.md").read_text()
    assert all(f" {name} " in table for name in columns())
    assert "not answered (one seed" in table and "tail recall (" in table  # one seed: no verdicts
    assert len(summary["claims"]) == 9 and summary["claims"][0].startswith("Goal")
    for plot in ("balanced_accuracy.png", "per_class_recall.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a re-run recomputes nothing: every cell file is left untouched
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}
    assert len(stamps) == len(columns())
    assert cli(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}


def test_unknown_column_is_a_clear_error(ham10000_root, tmp_path, capsys):
    code = cli(["compare", "--quick", "--data", str(ham10000_root), "--out", str(tmp_path / "c"),
                "--columns", "basic", "not_a_preset"])
    assert code == 2 and "unknown comparison column 'not_a_preset'" in capsys.readouterr().err


def test_claim_verdicts_respect_seed_noise():
    assert beyond_noise((0.60, 0.01, 3), (0.50, 0.01, 3))
    assert not beyond_noise((0.52, 0.05, 3), (0.50, 0.05, 3))  # 0.02 < 2·√(2·0.05²/3) ≈ 0.082
    assert verdict(True, (0.9, 0.0, 1), (0.1, 0.0, 1)).startswith("not answered")  # one seed: never a verdict
    assert verdict(True, (0.6, 0.01, 3), (0.5, 0.01, 3)) == "held"
    assert verdict(False, (0.6, 0.01, 3), (0.5, 0.01, 3)) == "did not hold"
    assert verdict(True, (0.52, 0.05, 3), (0.50, 0.05, 3)).startswith("within seed noise")


def test_goal_line_compares_the_best_head_with_every_baseline():
    def row(acc, bal):
        return {"accuracy": {"mean": acc, "std": 0.0}, "balanced_accuracy": {"mean": bal, "std": 0.0}}

    summary = {"columns": {"basic": row(0.76, 0.66), "long_tail": row(0.70, 0.68), "linear": row(0.75, 0.50),
                           "linear_la": row(0.64, 0.61)}}
    line = goal_line(summary)
    assert "not met" in line and "`long_tail`" in line  # best balanced accuracy, but below linear's accuracy
    summary["columns"]["long_tail"] = row(0.70, 0.60)
    line = goal_line(summary)
    assert "met" in line and "not met" not in line and "`basic`" in line and "`linear_la`" in line


def test_tail_classes_come_from_the_training_counts():
    names = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert tail_classes(names, [228, 359, 769, 80, 779, 4693, 99]) == ("df", "vasc", "akiec")
    assert tail_classes(("a", "b"), [5, 1]) == ("b",)


def test_fine_tuning_cells_each_start_from_the_pretrained_backbone(ham10000_root, feature_cache, tmp_path):
    """A fine-tuned backbone trains in place, so each fine-tuning cell prepares its own; reusing prepared inputs
    for a second fine-tuning run is refused rather than silently starting from the first run's weights."""
    import pytest

    from protohead.pipeline import prepare, train
    from protohead.runconfig import load_run_config

    tune = ["finetune=true", "finetune_blocks=1", "image_size=64", "subset_per_class=3", "epochs=1",
            "batch_size=8", "head.emb_dim=32", "head.num_heads=4", "progress=false", f"cache_dir={feature_cache}"]
    out = tmp_path / "cmp"
    assert cli(["compare", "--seeds", "2", "--columns", "linear", "--data", str(ham10000_root), "--out", str(out),
                *tune]) == 0
    first, second = (json.loads((out / "cells" / f"linear-seed{s}" / "cell.json").read_text()) for s in (0, 1))
    assert first["config"]["finetune"] and second["config"]["seed"] == 1
    config = load_run_config(overrides=[f"data={ham10000_root}", *tune])
    data = prepare(config)
    train(config, tmp_path / "one", data=data)
    with pytest.raises(ValueError, match="fine-tuned in place by an earlier run"):
        train(config, tmp_path / "two", data=data)
