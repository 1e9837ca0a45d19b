"""torchrun (gloo, CPU, 2 processes) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from protohead import runfolder
from protohead.pipeline import prepare
from protohead.runconfig import load_run_config
from protohead.training.checkpoint import read_checkpoint

ARGS = ["subset_per_class=8", "epochs=3", "batch_size=16", "push_every=1", "expand_every=1", "progress=false",
        "head.emb_dim=32", "head.num_heads=4", "head.dropout=0.0", "lr=3e-3"]


def train_cli(launcher: list[str], root: Path, cache: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*launcher, "-m", "protohead", "train", "--data", str(root), "--out", str(out),
               f"cache_dir={cache}", *ARGS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(ham10000_root, feature_cache, tmp_path):
    config = load_run_config(overrides=[f"data={ham10000_root}", f"cache_dir={feature_cache}", *ARGS])
    data = prepare(config)  # warm the feature cache once
    train_cli([sys.executable], ham10000_root, feature_cache, tmp_path / "one")
    train_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
              ham10000_root, feature_cache, tmp_path / "two")

    # every rank ends with the state rank 0 saved (prototypes, counts, push records: bit-identical)
    rank0, _ = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.safetensors")
    rank1, _ = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.rank1.safetensors")
    for key, value in rank1.items():
        if key.startswith("model/"):
            torch.testing.assert_close(rank0[key], value, rtol=0, atol=0, equal_nan=True, msg=key)

    logits = {}
    for name in ("one", "two"):
        model = runfolder.load_model(tmp_path / name, runfolder.LAST_CHECKPOINT).model
        tokens, pooled, _ = data.splits["val"].fetch(torch.arange(data.splits["val"].size), False)
        with torch.no_grad():
            logits[name], _, _ = model(tokens, pooled)
        logits[name + "_counts"] = model.bank.counts
    assert torch.equal(logits["one_counts"], logits["two_counts"])
    torch.testing.assert_close(logits["two"], logits["one"], atol=1e-4, rtol=0)


def test_two_process_finetuning_runs_and_ranks_agree(ham10000_root, tmp_path):
    """End-to-end fine-tuning under torchrun: completes, and every rank ends with rank 0's state."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "protohead", "train", "--data", str(ham10000_root), "--out", str(tmp_path / "ft"),
               "subset_per_class=2", "epochs=1", "batch_size=8", "finetune=true", "finetune_image_size=64",
               "progress=false", "push_every=1", "expand_every=0", "head.emb_dim=32", "head.num_heads=4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, _ = read_checkpoint(tmp_path / "ft" / "checkpoints" / "last.safetensors")
    rank1, _ = read_checkpoint(tmp_path / "ft" / "checkpoints" / "last.rank1.safetensors")
    assert any(key.startswith("model/backbone.") for key in rank1)
    for key, value in rank1.items():
        if key.startswith("model/"):
            torch.testing.assert_close(rank0[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
