"""End to end on a small stratified subset of the real HAM10000 images through the real Lite0 backbone."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_exact

from protohead.backbones.base import Backbone
from protohead.cli.main import main as cli
from protohead.pipeline import evaluate_run, run
from protohead.runconfig import load_run_config
from protohead.runfolder import RunFolderError
from protohead.training.checkpoint import read_checkpoint

PER_CLASS = 12  # images per class and split: every class present, ~250 images in all


def config(root: Path, cache: Path, *overrides: str, **fields):
    base = [f"data={root}", f"cache_dir={cache}", f"subset_per_class={PER_CLASS}", "progress=false",
            "batch_size=16", "head.emb_dim=64", "head.num_heads=4"]
    return load_run_config(overrides=[*base, *overrides], **fields)


def test_short_run_beats_chance_and_writes_every_output(ham10000_root, feature_cache, tmp_path, monkeypatch):
    cfg = config(ham10000_root, feature_cache, "epochs=12", "push_every=4", "expand_every=4", "lr=3e-3")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["balanced_accuracy"] > 0.30  # chance is 1/7 ≈ 0.14
    for name in ("metrics.json", "report.md", "history.json", "config.yaml", "confusion_matrix.png",
                 "reliability.png", "risk_coverage.png", "checkpoints/best.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written["per_class_recall"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert any("pushed" in record for record in history)
    # model selection used validation only: the best epoch is the arg-max of val balanced accuracy
    best = max(range(len(history)), key=lambda i: history[i]["val_balanced_accuracy"])
    chosen = json.loads((tmp_path / "run" / "history.json").read_text())["best"]
    assert chosen["epoch"] == best
    # the post-hoc shift chosen on validation for that epoch is the one applied on test
    assert written["posthoc_tau"] == chosen["posthoc_tau"] == history[best]["posthoc_tau"]
    assert history[best]["val_accuracy"] >= history[best]["val_accuracy_raw"] - cfg.posthoc_accuracy_tolerance
    # re-evaluation from the run folder scores the same, and refuses a backbone whose weights are not the run's
    again = evaluate_run(tmp_path / "run", out_dir=tmp_path / "again")
    assert again["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    monkeypatch.setattr(Backbone, "cache_key", lambda self: "efficientnet_lite0@224px:other-weights")
    with pytest.raises(RunFolderError, match="is not the one run"):
        evaluate_run(tmp_path / "run", out_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_bfloat16_training_on_the_cpu_learns(ham10000_root, feature_cache, tmp_path, monkeypatch):
    """``amp_cpu=true``: every training step runs under CPU bfloat16 autocast, the model still learns, and every
    eval-mode forward (validation, push, test) runs outside autocast, in float32."""
    from protohead.device import autocast as real_autocast
    from protohead.head import HeadOptimal
    from protohead.training import loop

    entered, evaluations = [], []

    @contextlib.contextmanager
    def spy(device, enabled, cpu=False):
        with real_autocast(device, enabled, cpu=cpu):
            entered.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            yield

    forward = HeadOptimal.forward

    def eval_spy(self, *args, **kwargs):
        if not self.training:
            evaluations.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(loop, "autocast", spy)
    monkeypatch.setattr(HeadOptimal, "forward", eval_spy)
    cfg = config(ham10000_root, feature_cache, "epochs=12", "push_every=4", "expand_every=4", "lr=3e-3",
                 "amp_cpu=true")
    metrics = run(cfg, tmp_path / "run")
    assert entered and all(entered)
    assert evaluations and not any(evaluations)
    assert metrics["balanced_accuracy"] > 0.30  # chance is 1/7 ≈ 0.14


def test_bfloat16_on_a_cpu_without_native_support_warns(ham10000_root, feature_cache, tmp_path, monkeypatch):
    from protohead import device

    assert isinstance(device.cpu_has_fast_bfloat16(), bool)
    monkeypatch.setattr(device, "cpu_has_fast_bfloat16", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        run(config(ham10000_root, feature_cache, "epochs=1", "amp_cpu=true", preset="linear"), tmp_path / "run")


@pytest.mark.parametrize("model", ["linear_la", "uncertainty"])
def test_baseline_and_abstention_runs(ham10000_root, feature_cache, tmp_path, model):
    metrics = run(config(ham10000_root, feature_cache, "epochs=3", preset=model), tmp_path / "run")
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and metrics["uncertainty_source"] == "given"


@pytest.mark.parametrize("amp_cpu", ["false", "true"])
def test_resume_continues_to_the_same_result(ham10000_root, feature_cache, tmp_path, monkeypatch, amp_cpu):
    cfg = config(ham10000_root, feature_cache, "epochs=4", "push_every=2", "expand_every=2", f"amp_cpu={amp_cpu}")
    assert_resume_is_exact(lambda run_dir, resume: run(cfg, run_dir, resume=resume), tmp_path, monkeypatch, 2)


def test_checkpoint_corruption_is_reported(ham10000_root, feature_cache, tmp_path):
    run(config(ham10000_root, feature_cache, "epochs=1", preset="linear"), tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "last.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="last\\.safetensors"):
        read_checkpoint(path)
    header = struct.pack("<Q", 10**12)
    path.write_bytes(header + data[8:])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(path)


def test_existing_run_directory_is_refused(ham10000_root, feature_cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = cli(["run", "--data", str(ham10000_root), "--out", str(out), f"cache_dir={feature_cache}"])
    assert code == 2
    assert "not a protohead run folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(("args", "message"), [
    (["epochs=abc"], "expects int"),
    (["nope=1"], "unknown config key"),
    (["head.num_protos=3"], "unknown head option"),
    (["split=sideways"], "expects one of"),
    (["--preset", "not_a_preset", "epochs=1"], "unknown preset"),
])
def test_config_errors_are_one_line_exit_2(ham10000_root, tmp_path, capsys, args, message):
    cache = tmp_path / "cache"
    code = cli(["run", "--data", str(ham10000_root), "--out", str(tmp_path / "r"), *args, f"cache_dir={cache}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not cache.exists() and not (tmp_path / "r").exists()  # refused before any image is read


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    code = cli(["run", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert code == 2 and "nowhere" in capsys.readouterr().err


def test_yaml_config_file(tmp_path, ham10000_root):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {ham10000_root}\nepochs: 2\nhead:\n  emb_dim: 32\n")
    cfg = load_run_config(path, ["epochs=3"])
    assert cfg.epochs == 3 and cfg.head == {"emb_dim": 32}
    path.write_text("epochs: [1, 2]\n")
    with pytest.raises(ValueError, match="epochs"):
        load_run_config(path)


def test_end_to_end_finetuning_trains_the_backbone(ham10000_root, tmp_path):
    """finetune=true: no feature cache, the backbone is trained at its own learning rate and checkpointed."""
    from protohead.pipeline import train
    from protohead.training.checkpoint import read_checkpoint as read

    cfg = load_run_config(overrides=[f"data={ham10000_root}", "subset_per_class=2", "epochs=1", "batch_size=7",
                                     "finetune=true", "finetune_image_size=64", "backbone_lr=1e-3", "progress=false",
                                     "augment=strong", "loader_threads=2", "push_every=1", "expand_every=0",
                                     "head.emb_dim=32", "head.num_heads=4"])
    result = train(cfg, tmp_path / "ft")
    tensors, _ = read(tmp_path / "ft" / "checkpoints" / "last.safetensors")
    backbone_keys = [k for k in tensors if k.startswith("model/backbone.")]
    assert backbone_keys, "the checkpoint must hold the backbone"
    from protohead.backbones import build_backbone

    pretrained = build_backbone(cfg.backbone, cfg.finetune_image_size).state_dict()
    changed = [k for k in backbone_keys if tensors[k].is_floating_point()
               and not torch.equal(tensors[k], pretrained[k.removeprefix("model/backbone.")])]
    assert changed, "fine-tuning must move the backbone weights"
    assert len(result["history"]) == 1 and "pushed" in result["history"][0]
