"""Hostile command lines: each exits with code 2 and one line on stderr naming the problem.

tests/test_pipeline.py already covers bad override types/keys/values, an unknown preset, a missing data folder
and an existing run directory for ``run``; these are the remaining cases.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protohead.cli.main import main as cli


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def split_layout(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png with counts[split][class] images (0 → an empty class folder)."""
    for split, classes in counts.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                png(root / split / name / f"{i}.png", 40 * i + 7)
    return root


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"protohead {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


FULL = {"a": 2, "b": 2}


@pytest.mark.parametrize(("layout", "message"), [
    ({"train": FULL, "val": FULL, "test": {"a": 0, "b": 0}}, "split 'test' is empty"),
    ({"train": {"a": 2, "b": 0}, "val": FULL, "test": FULL}, "['b'] absent from train"),
    ({"train": FULL, "val": FULL}, "need train, val and test"),
])
def test_bad_class_folder_datasets(tmp_path, capsys, layout, message):
    data = split_layout(tmp_path / "data", layout)
    one_line_exit_2(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                             f"cache_dir={tmp_path / 'cache'}", "epochs=1"], message, str(data))


def test_flat_layout_with_an_empty_class_folder(tmp_path, capsys):
    data = tmp_path / "flat"
    for i in range(10):
        png(data / "a" / f"{i}.png", i)
    (data / "empty").mkdir()
    one_line_exit_2(capsys, ["run", "--data", str(data), "--out", str(tmp_path / "run")], "['empty'] absent from train")


def test_medmnist_with_an_empty_test_split(tmp_path, capsys):
    npz = tmp_path / "tiny.npz"
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 0)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(npz, **arrays)
    one_line_exit_2(capsys, ["run", "--data", str(npz), "--out", str(tmp_path / "run")], "split 'test' is empty",
                    str(npz))


def test_data_path_that_is_not_a_dataset(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    one_line_exit_2(capsys, ["extract", "--data", str(text)], "not a .npz")


@pytest.mark.parametrize(("overrides", "message"), [
    (["lr=fast"], "'lr' expects float"),
    (["progress=maybe"], "'progress' expects bool"),
    (["subset_per_class=[3]"], "'subset_per_class' expects int or null"),
    (["head=7"], "'head' expects dict"),
    (["head.emb_dim=abc"], "emb_dim must be a positive integer"),
    (["head.dropout=1.5"], "dropout must be in [0, 1)"),
    (["epochs=0"], "epochs and batch_size must be ≥ 1"),
    (["lr=-1"], "learning rates must be positive"),
    (["head.emb_dim.x=1"], "emb_dim must be a positive integer, got {'x': 1}"),
    (["epochs=3", "epochs.x=1"], "'epochs' is not a mapping"),
    (["epochs"], "must look like key=value"),
    (["=3"], "empty key"),
    (["Epochs=3"], "unknown config key(s): Epochs"),
    (["epochs=[1"], "cannot parse the value of override"),
])
def test_wrong_config_types_and_keys(tmp_path, capsys, overrides, message):
    one_line_exit_2(capsys, ["train", "--out", str(tmp_path / "run"), *overrides], message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("epochs: 2\nnot_a_key: 1\n", "unknown config key(s): not_a_key"),
    ("- epochs\n- 2\n", "must hold a mapping"),
    ("epochs: [unclosed\n", "is not valid YAML"),
    ("head:\n  temperature: -1\n", "temperature must be positive"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    one_line_exit_2(capsys, ["run", "--config", str(path), "--out", str(tmp_path / "run")], message)


def test_missing_config_file(tmp_path, capsys):
    one_line_exit_2(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "nope.yaml does not exist")


def test_existing_run_directory_is_kept_by_train(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.safetensors").write_bytes(b"precious")
    one_line_exit_2(capsys, ["train", "--out", str(out), "epochs=1"], "not a protohead run folder", "never deletes")
    assert (out / "checkpoints" / "last.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "last.safetensors"]


def test_evaluate_a_folder_that_is_not_a_run(tmp_path, capsys):
    one_line_exit_2(capsys, ["evaluate", str(tmp_path)], "not a protohead run folder")


def test_compare_with_zero_seeds(tmp_path, capsys):
    one_line_exit_2(capsys, ["compare", "--seeds", "0", "--out", str(tmp_path / "c")], "--seeds must be at least 1")


# With the real Lite0 backbone at its smallest input (32 px) on a handful of 8x8 images: ~2 s each.
TINY = ["image_size=32", "progress=false", "epochs=1", "batch_size=4", "head.emb_dim=16", "head.num_heads=2"]


def test_unreadable_image_names_the_file(tmp_path, capsys):
    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    (data / "val" / "b" / "1.png").write_bytes(b"not a png")
    one_line_exit_2(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                             f"cache_dir={tmp_path / 'cache'}", *TINY], "val/b/1.png")


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path, capsys):
    data = split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY]
    assert cli(argv) == 0
    last = out / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:-10])
    capsys.readouterr()
    err = one_line_exit_2(capsys, [*argv, "--resume"], "corrupt")
    assert re.search(re.escape(str(last)), err)
