"""``protohead compare --quick`` end to end on a small real subset."""

from __future__ import annotations

import json
import math

from protohead.cli.main import main as cli
from protohead.compare import columns

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
    assert all(f" {name} " in table for name in columns()) and "held" in table
    assert len(summary["claims"]) == 7
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
