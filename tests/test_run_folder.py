"""The run folder and the feature cache never lose anything (issue 13): ``--overwrite`` only removes a
protohead run's own files, resume refuses a changed config, divergence stops training, failed starts leave
nothing, concurrent writers are locked out, stale temporaries are cleaned, broken run configs are one line.

Command-line cases use tiny 8×8 class-folder datasets and the real Lite0 backbone at 32 px (~2 s each).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_errors import FULL, TINY, one_line_exit_2, split_layout

from protohead import runfolder
from protohead.cli.main import main as cli
from protohead.features import extract_features, feature_cache_key
from protohead.runconfig import load_run_config
from protohead.training.checkpoint import read_checkpoint
from protohead.training.loop import TrainingDivergedError, check_finite_step


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (links not followed) → its bytes."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return split_layout(tmp_path / "data", {"train": FULL, "val": FULL, "test": FULL})


def train_argv(data: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY, *extra]


# ----------------------------------------------------------------------------- 1. --overwrite
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, data):
    out = tmp_path / "sb"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    one_line_exit_2(capsys, train_argv(data, out, tmp_path, "--overwrite"), "not a protohead run folder")
    assert tree(out) == {"keep.txt": b"x"}


def test_overwrite_refuses_a_run_holding_foreign_files(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli(train_argv(data, out, tmp_path)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "keep.safetensors.bak").write_text("mine too")
    before = tree(out)
    one_line_exit_2(capsys, train_argv(data, out, tmp_path, "--overwrite"), "notes.txt", "keep.safetensors.bak")
    assert tree(out) == before
    # a pattern's * never spans a folder: files one level deeper than protohead writes are the user's
    (out / "checkpoints" / "keep.safetensors.bak").unlink()
    (out / "notes.txt").unlink()
    for nested in ("checkpoints/archive/epoch3.safetensors", "explain/my_notes/photo.png", "eval-x/a/metrics.json",
                   "sub/predictions_test.npz"):
        (out / nested).parent.mkdir(parents=True, exist_ok=True)
        (out / nested).write_text("mine")
    before = tree(out)
    one_line_exit_2(capsys, train_argv(data, out, tmp_path, "--overwrite"), "checkpoints/archive/epoch3.safetensors",
                    "explain/my_notes/photo.png", "eval-x/a/metrics.json", "sub/predictions_test.npz")
    assert tree(out) == before


def test_overwrite_replaces_a_run_of_its_own(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli(train_argv(data, out, tmp_path)) == 0
    (out / "metrics.json").write_text("stale")
    (out / "ood-noise").mkdir()
    for name in ("ood.json", "ood_scores.csv", "ood_histogram.png", "ood_roc.png"):  # evaluate --ood's output
        (out / "ood-noise" / name).write_text("stale")
    assert cli(train_argv(data, out, tmp_path, "--overwrite")) == 0
    assert not (out / "metrics.json").exists() and not (out / "ood-noise").exists()
    assert runfolder.read_marker(out)["status"] == "finished"


@pytest.mark.parametrize("where", ["data", "data-parent", "inside-data", "cwd", "cwd-parent"])
def test_out_may_not_be_the_data_the_working_directory_or_their_relatives(tmp_path, capsys, data, monkeypatch,
                                                                           where):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "precious.txt").write_text("keep")
    monkeypatch.chdir(work / "sub")
    out = {"data": data, "data-parent": data.parent, "inside-data": data / "train" / "run",
           "cwd": Path("."), "cwd-parent": Path("..")}[where]
    before_data, before_work = tree(data), tree(work)
    one_line_exit_2(capsys, train_argv(data, out, tmp_path, "--overwrite"), "--out")
    assert tree(data) == before_data and tree(work) == before_work


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(out_choice=st.sampled_from(["data", "data/train", "base", ".", "..", "fresh", "run", "run/checkpoints",
                                   "link-to-data", "link-to-cwd", "link-to-run", "cwd/sub"]),
       data_choice=st.sampled_from(["data", "run", "cwd"]),
       run_has_foreign=st.booleans(), run_has_link_to_data=st.booleans(), resume=st.booleans())
def test_overwrite_never_removes_a_file_it_did_not_write(out_choice, data_choice, run_has_foreign,
                                                         run_has_link_to_data, resume):
    """Property: whatever ``--out`` and ``--data`` are (same, nested either way, ``.``, ``..``, links), an
    overwrite (or resume) leaves every file that protohead did not write byte-identical."""
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp).resolve()
        data_dir = base / "data"
        (data_dir / "train").mkdir(parents=True)
        (data_dir / "train" / "a.png").write_bytes(b"image")
        (data_dir / "meta.csv").write_text("lesion_id,image_id")
        cwd = base / "cwd"
        (cwd / "sub").mkdir(parents=True)
        (cwd / "work.txt").write_text("work")
        run = base / "run"
        (run / "checkpoints").mkdir(parents=True)
        runfolder.write_config(run, load_run_config())
        (run / "checkpoints" / "last.safetensors").write_bytes(b"ours")
        if run_has_foreign:
            (run / "user.txt").write_text("theirs")
        if run_has_link_to_data:
            (run / "metrics.json").symlink_to(data_dir / "meta.csv")
        for name, target in (("link-to-data", data_dir), ("link-to-cwd", cwd), ("link-to-run", run)):
            (base / name).symlink_to(target, target_is_directory=True)
        protected = {path: content for path, content in tree(base).items()
                     if not path.startswith("run/") or path == "run/user.txt"}
        data_path = {"data": data_dir, "run": run, "cwd": cwd}[data_choice]
        out = {"data": data_dir, "data/train": data_dir / "train", "base": base, ".": Path("."), "..": Path(".."),
               "fresh": base / "fresh", "run": run, "run/checkpoints": run / "checkpoints",
               "link-to-data": base / "link-to-data", "link-to-cwd": base / "link-to-cwd",
               "link-to-run": base / "link-to-run", "cwd/sub": cwd / "sub"}[out_choice]
        previous = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.suppress(runfolder.RunFolderError):
                plan = runfolder.plan_run_dir(out, data_path, resume=resume, overwrite=True)
                with runfolder.open_run_dir(out, plan, load_run_config(), data_path):
                    (Path(out) / "checkpoints").mkdir(exist_ok=True)
                    (Path(out) / "checkpoints" / "best.safetensors").write_bytes(b"new")
        finally:
            os.chdir(previous)
        after = tree(base)
        for path, content in protected.items():
            assert after.get(path) == content, (path, out_choice, data_choice)


# ----------------------------------------------------------------------------- 2. resume
def test_resume_refuses_a_changed_config_and_keeps_the_stored_one(tmp_path, capsys, data):
    out = tmp_path / "run"
    argv = train_argv(data, out, tmp_path)
    assert cli(argv) == 0
    stored = (out / "config.yaml").read_bytes()
    for change, key in ((["head.emb_dim=32"], "head.emb_dim"), (["--preset", "head_v1"], "preset"),
                        (["lr=0.5"], "lr")):
        capsys.readouterr()
        one_line_exit_2(capsys, [*argv, "--resume", *change], "--resume refused", key)
        assert (out / "config.yaml").read_bytes() == stored
    assert cli([*argv, "--resume"]) == 0  # the same command continues
    assert cli(["train", "--out", str(out), "--resume"]) == 0  # so does --resume alone: the stored config
    assert (out / "config.yaml").read_bytes() == stored


def test_resume_with_allowed_change_records_it(tmp_path, data):
    out = tmp_path / "run"
    argv = train_argv(data, out, tmp_path)
    assert cli(argv) == 0
    assert cli([*argv, "--resume", "--allow-config-change", "epochs=2"]) == 0
    assert runfolder.read_config(out).epochs == 2
    assert len(json.loads((out / "history.json").read_text())["history"]) == 2


def test_resume_of_a_folder_without_a_run(tmp_path, capsys, data):
    one_line_exit_2(capsys, [*train_argv(data, tmp_path / "none", tmp_path), "--resume"], "nothing to resume")
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- 3. divergence
def test_divergence_stops_at_the_first_non_finite_loss(tmp_path, capsys, data):
    out = tmp_path / "run"
    err = one_line_exit_2(capsys, train_argv(data, out, tmp_path, "lr=1e30", "epochs=3"), "diverged", "epoch")
    marker = runfolder.read_marker(out)
    assert marker["status"] == "failed" and "diverged" in marker["error"], err
    for name in ("best", "last"):
        path = out / "checkpoints" / f"{name}.safetensors"
        if path.exists():  # whatever was kept was written before the divergence: finite
            tensors, _ = read_checkpoint(path)
            assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/")
                       and t.is_floating_point() and "push_similarity" not in k)


def test_check_finite_step_names_the_bad_terms(tmp_path):
    info = {"ce": torch.tensor(float("nan")), "cluster": torch.tensor(0.5), "grad_norm": torch.tensor(1.0)}
    with pytest.raises(TrainingDivergedError, match=r"epoch 3, step 5.*ce=nan.*no epoch finished"):
        check_finite_step(torch.tensor(float("nan")), info, 2, 4, 0.1, tmp_path / "last.safetensors")
    info = {"ce": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf"))}
    with pytest.raises(TrainingDivergedError, match="grad_norm=inf"):
        check_finite_step(torch.tensor(1.0), info, 0, 0, 0.1, tmp_path / "last.safetensors")
    check_finite_step(torch.tensor(1.0), {"grad_norm": torch.tensor(2.0)}, 0, 0, 0.1, tmp_path)  # finite: fine


# ----------------------------------------------------------------------------- 5. failed starts
def test_failed_starts_create_nothing_and_the_fixed_command_then_runs(tmp_path, capsys, data):
    out = tmp_path / "run"
    one_line_exit_2(capsys, train_argv(tmp_path / "missing", out, tmp_path), "missing")
    assert not out.exists()
    bad = data / "val" / "b" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    one_line_exit_2(capsys, train_argv(data, out, tmp_path), "val/b/1.png")
    assert not out.exists()
    bad.write_bytes(good)
    assert cli(train_argv(data, out, tmp_path)) == 0
    assert runfolder.read_marker(out)["status"] == "finished"


# ----------------------------------------------------------------------------- 6. concurrency
def test_a_live_run_folder_is_locked(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli(train_argv(data, out, tmp_path)) == 0
    before = tree(out)
    with runfolder.lock_run_dir(out):  # as a live run holds it
        one_line_exit_2(capsys, train_argv(data, out, tmp_path, "--overwrite"), "in use")
    assert tree(out) == before


def test_concurrent_extractions_into_one_cache_extract_once(tmp_path, monkeypatch):
    from test_features import TinyBackbone, jpeg_split

    from protohead import features

    slow_write = features._write_features

    def slow(*args, **kwargs):
        time.sleep(0.3)  # widen the race window: both threads miss before either finishes
        return slow_write(*args, **kwargs)

    monkeypatch.setattr(features, "_write_features", slow)
    split = jpeg_split(4)
    backbones = [TinyBackbone(), TinyBackbone()]
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = extract_features(backbones[i], split, tmp_path, progress=False, num_workers=0)
        except Exception as error:  # pragma: no cover - the failure this test guards against
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sum(b.calls > 0 for b in backbones) == 1  # one extraction; the other found the entry
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)


# ----------------------------------------------------------------------------- 7. stale temporaries
def test_stale_extraction_temporaries_are_removed(tmp_path):
    from test_features import TinyBackbone, jpeg_split

    split, backbone = jpeg_split(3), TinyBackbone()
    key = feature_cache_key(backbone, split)
    stale = tmp_path / f".tmp-{key[:16]}-killed"
    stale.mkdir()
    (stale / "tokens.f16").write_bytes(b"half")
    other = tmp_path / ".tmp-0000000000000000-live"  # another entry's writer: not ours to remove
    other.mkdir()
    extract_features(backbone, split, tmp_path, progress=False)
    assert not stale.exists() and other.exists()


# ----------------------------------------------------------------------------- 8. broken run configs
@pytest.mark.parametrize(("content", "fragment"), [
    ("", "must hold a mapping"),
    ("!!python/object/apply:os.system ['echo hacked']\n", "python/object"),
    ("epochs: [1, 2\n", "not valid YAML"),
    ("nonsense_key: 1\n", "nonsense_key"),
])
def test_evaluate_with_a_broken_run_config_is_one_line(tmp_path, capsys, content, fragment):
    (tmp_path / "config.yaml").write_text(content)
    err = one_line_exit_2(capsys, ["evaluate", str(tmp_path)], fragment, "config.yaml")
    assert "hacked" not in capsys.readouterr().out + err


# ----------------------------------------------------------------------------- what users expect of a training CLI
def test_one_console_line_and_one_csv_row_per_epoch(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli([*train_argv(data, out, tmp_path), "epochs=2", "progress=true"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "val bal acc" in line and not line.startswith("final push")]  # not the bars
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert sum(line.startswith("final push: ") for line in err) == 1  # the default (patch) preset anchors once
    assert all(line.startswith("epoch ") and "tau" in line and line.endswith(" s") for line in lines)
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss/total,val_accuracy,val_balanced_accuracy,posthoc_tau")
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("protohead ")
