"""Faults: kill -9 mid-training then --resume, kills mid-checkpoint-write, corrupt files, malicious pickles."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from protohead.runconfig import load_run_config
from protohead.training.checkpoint import (
    CHECKSUM_KEY,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src"
FAULT_SEED = int(os.environ.get("PROTOHEAD_FAULT_SEED", "0"))  # seeds the kill delay; vary it to explore
# Same subset as tests/test_pipeline.py so one session extracts the shared feature cache once.
PER_CLASS = 12
TRAIN_ARGS = ["subset_per_class=12", "epochs=4", "progress=false", "head.emb_dim=32", "head.num_heads=4",
              "batch_size=16", "push_every=2", "expand_every=2"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    differ = [key for key in expected  # bit-identical; NaN marks never-pushed slots
              if not torch.equal(torch.nan_to_num(actual[key], nan=-7.0), torch.nan_to_num(expected[key], nan=-7.0))
              or actual[key].isnan().ne(expected[key].isnan()).any()]
    assert differ == [], f"{len(differ)} of {len(expected)} tensors differ"


# ------------------------------------------------------------------------------------ kill -9 and resume
def test_sigkill_mid_training_then_resume_is_bit_identical(ham10000_root, feature_cache, tmp_path):
    from protohead.pipeline import prepare, train

    cfg = load_run_config(overrides=[f"data={ham10000_root}", f"cache_dir={feature_cache}", *TRAIN_ARGS])
    prepare(cfg)  # warms the feature cache: the subprocesses only read it
    # The uninterrupted reference, in process. Not train(..., data=prepared): train() seeds torch before
    # prepare(), whose backbone construction draws from the global RNG, so passing data changes the weights.
    train(cfg, tmp_path / "straight")

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "protohead", "train", "--data", str(ham10000_root), "--out", str(out),
               f"cache_dir={feature_cache}", *TRAIN_ARGS]
    last = out / "checkpoints" / "last.safetensors"
    delay = random.Random(FAULT_SEED).uniform(0.0, 1.5)
    child = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert last.exists(), f"no checkpoint before the kill: {err.decode()[-2000:]}"
    killed_mid_training = child.returncode == -signal.SIGKILL
    assert killed_mid_training or child.returncode == 0, err.decode()[-2000:]
    epoch_at_kill = json.loads(_metadata(last))["user"]["epoch"]
    print(f"kill -9 after {delay:.2f} s: returncode {child.returncode}, last checkpoint epoch {epoch_at_kill}")

    resumed = subprocess.run([*command, "--resume"], env=child_env(), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    straight, _ = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    final, meta = read_checkpoint(last)
    assert meta["user"]["epoch"] == 3 and len(meta["user"]["history"]) == 4
    reference = json.loads((tmp_path / "straight" / "history.json").read_text())
    assert [r["val_balanced_accuracy"] for r in meta["user"]["history"]] == [
        r["val_balanced_accuracy"] for r in reference["history"]], f"resumed from epoch {epoch_at_kill}"
    assert_same_tensors(straight, final)


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["protohead"]


# ------------------------------------------------------------------------- kills during checkpoint writing
KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import safetensors.torch
    from protohead.training.checkpoint import save_checkpoint

    path = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    save_checkpoint(path, model, metadata={"version": 1})
    real_save = safetensors.torch.save

    def half_then_sigkill(tensors, filename, metadata=None):
        data = real_save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = half_then_sigkill
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(path, model, metadata={"version": 2})
""")


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.safetensors"
    child = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], env=child_env(),
                           capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    tensors, meta = read_checkpoint(path)
    assert meta["user"] == {"version": 1}
    torch.manual_seed(0)
    assert torch.equal(tensors["model/weight"], torch.nn.Linear(256, 256).weight.detach())
    # the half-written temporary survives the kill, hidden, under a name no loader opens ...
    strays = [p for p in path.parent.iterdir() if p != path]
    assert len(strays) == 1 and re.fullmatch(r"\.last\.safetensors\..+\.tmp", strays[0].name), strays
    with pytest.raises(ValueError, match="corrupt or truncated"):  # ... and it is detectably incomplete
        read_checkpoint(strays[0])
    save_checkpoint(path, torch.nn.Linear(256, 256))  # it does not block the next save, which removes it
    read_checkpoint(path)
    assert [p for p in path.parent.iterdir()] == [path]


def test_failed_checkpoint_write_keeps_the_previous_one_and_cleans_up(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "last.safetensors"
    model = torch.nn.Linear(8, 3)
    save_checkpoint(path, model, metadata={"version": 1})
    before = path.read_bytes()
    real_save = safetensors.torch.save

    def half_then_fail(tensors, filename, metadata=None):
        data = real_save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, metadata={"version": 2})
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    assert load_checkpoint(path, torch.nn.Linear(8, 3)) == {"version": 1}


# ---------------------------------------------------------------------------------- corrupted checkpoints
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    return save_checkpoint(tmp_path / "last.safetensors", model, optimizer, metadata={"epoch": 3})


def _data_offset(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("damage", ["empty", "truncated header", "truncated data", "garbage", "huge header length",
                                    "header not json", "flipped tensor byte", "flipped metadata digit",
                                    "tensor data appended"])
def test_corrupt_checkpoint_is_a_value_error_naming_the_file(checkpoint, damage):
    data = bytearray(checkpoint.read_bytes())
    start = _data_offset(data)
    if damage == "empty":
        data = b""
    elif damage == "truncated header":
        data = data[: start // 2]
    elif damage == "truncated data":
        data = data[: start + (len(data) - start) // 2]
    elif damage == "garbage":
        data = random.Random(0).randbytes(len(data))
    elif damage == "huge header length":
        data[:8] = struct.pack("<Q", 10**12)
    elif damage == "header not json":
        data[8:12] = b"\xff\xfe{["
    elif damage == "flipped tensor byte":  # same size, valid header: only the checksum can tell
        data[start + (len(data) - start) // 3] ^= 0x10
    elif damage == "flipped metadata digit":  # "epoch": 3 -> "epoch": 7, header still valid JSON
        text = bytes(data[8:start])
        assert text.count(b'\\"epoch\\": 3') == 1
        data[8:start] = text.replace(b'\\"epoch\\": 3', b'\\"epoch\\": 7')
    elif damage == "tensor data appended":
        data += b"\0" * 64
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(checkpoint))) as caught:
        read_checkpoint(checkpoint)
    assert "corrupt" in str(caught.value)
    with pytest.raises(ValueError, match=re.escape(str(checkpoint))):
        load_checkpoint(checkpoint, torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)))


def test_checkpoint_without_checksum_still_loads(checkpoint):
    """Files written before the sha256 existed load unverified (backward compatible)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert len(header[CHECKSUM_KEY]) == 64
    save_file(tensors, str(checkpoint), metadata={"protohead": header["protohead"]})
    with pytest.warns(UnverifiedCheckpointWarning, match=str(checkpoint)):
        loaded, meta = read_checkpoint(checkpoint)
    assert meta["user"] == {"epoch": 3}
    assert_same_tensors(tensors, loaded)


def test_corrupt_feature_cache_names_the_file(tmp_path):
    from protohead.backbones import Backbone
    from protohead.data.base import ImageSplit
    from protohead.features import MANIFEST_FILE, POOLED_FILE, extract_features, feature_cache_key

    class Flat(Backbone):
        def __init__(self) -> None:
            super().__init__()
            self.name, self.image_size, self.num_tokens, self.feature_dim = "flat", 8, 4, 3
            self.pixel_mean = self.pixel_std = (1.0, 1.0, 1.0)
            self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)

        def forward(self, x):
            tokens = x[:, :, ::4, ::4].flatten(2).transpose(1, 2) * self.scale
            return tokens, tokens.mean(1)

    images = [np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(5)]
    split = ImageSplit(name="train", ids=tuple(f"im{i}" for i in range(5)), labels=np.arange(5) % 2,
                       loader=images.__getitem__, content_key="faults")
    backbone = Flat()
    extract_features(backbone, split, tmp_path, progress=False, num_workers=0)
    entry = tmp_path / feature_cache_key(backbone, split)
    pooled = entry / POOLED_FILE
    pooled.write_bytes(pooled.read_bytes()[:-2])  # truncated pooled features
    with pytest.raises(ValueError, match=re.escape(str(pooled))):
        extract_features(backbone, split, tmp_path, progress=False, on_corrupt="error")
    with pytest.warns(RuntimeWarning, match=re.escape(str(pooled))):  # default: warn naming it, rebuild
        extract_features(backbone, split, tmp_path, progress=False, num_workers=0)
    manifest = entry / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes()[:40])  # truncated manifest
    with pytest.raises(ValueError, match=re.escape(str(manifest))):
        extract_features(backbone, split, tmp_path, progress=False, on_corrupt="error")


# --------------------------------------------------------------------------------------- malicious pickles
class CreatesMarker:
    """Unpickling this object creates ``path`` (``open(path, "w")``): proof that the pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickles_are_never_executed(tmp_path):
    from protohead.backbones import build_backbone
    from protohead.backbones.timm_backbone import load_state_dict_file
    from protohead.data import load_medmnist_npz

    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": CreatesMarker(marker)})
    pickle.loads(payload)["state_dict"].close()  # the payload is live: plain unpickling runs it ...
    assert marker.exists()
    marker.unlink()
    zipped = io.BytesIO()
    torch.save({"state_dict": CreatesMarker(marker)}, zipped)  # torch.save's zip format, same payload

    attempts = []
    for name in ("last.safetensors", "best.safetensors"):
        path = tmp_path / "checkpoints" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload)
        attempts += [lambda p=path: read_checkpoint(p), lambda p=path: load_checkpoint(p, torch.nn.Linear(2, 2))]
    for name, data in (("raw.pth", payload), ("zipped.pth", zipped.getvalue()), ("raw.bin", payload)):
        (tmp_path / name).write_bytes(data)
        attempts.append(lambda p=tmp_path / name: load_state_dict_file(p))
    attempts.append(lambda: build_backbone("efficientnet_lite0", image_size=32, weights_path=tmp_path / "raw.pth"))
    attempts.append(lambda: build_backbone("efficientnet_lite0", image_size=32,
                                           weights_path=tmp_path / "zipped.pth"))
    npz = tmp_path / "evil.npz"
    arrays = {f"{s}_{k}": np.zeros((2, 4, 4) if k == "images" else (2,), dtype=np.uint8)
              for s in ("train", "val", "test") for k in ("images", "labels")}
    arrays["train_labels"] = np.array([CreatesMarker(marker), 0], dtype=object)
    np.savez(npz, **arrays)
    attempts.append(lambda: load_medmnist_npz(npz))

    for attempt in attempts:
        # every loader: a ValueError naming the file (torch.load(weights_only=True) refuses the pickle)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
            attempt()
        assert not marker.exists()


def calls(text: str, function: str) -> list[str]:
    """Source text of every ``function(...)`` call in ``text`` (balanced parentheses)."""
    found = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(function)}\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append(text[match.start():end + 1])
    return found


def unsafe_deserialisation(text: str) -> list[str]:
    problems = [m.group(0) for m in re.finditer(r"\b(c?pickle|dill|joblib|cloudpickle|marshal)\.loads?\(|"
                                                r"\bUnpickler\(", text)]
    problems += [call for call in calls(text, "torch.load") if not re.search(r"weights_only\s*=\s*True", call)]
    problems += [call for call in calls(text, "np.load") + calls(text, "numpy.load")
                 if re.search(r"allow_pickle\s*=\s*True", call)]
    return problems


def test_no_unsafe_deserialisation_in_the_source():
    offenders = {str(path.relative_to(SRC)): problems for path in sorted(SRC.rglob("*.py"))
                 if (problems := unsafe_deserialisation(path.read_text()))}
    assert offenders == {}
    # the scanner itself finds what it should
    assert unsafe_deserialisation("x = torch.load(Path(p), map_location='cpu')\ny = pickle.load(f)") == [
        "pickle.load(", "torch.load(Path(p), map_location='cpu')"]
    assert unsafe_deserialisation("torch.load(open(p), weights_only=True); np.load(p)") == []
    assert unsafe_deserialisation("np.load(p, allow_pickle=True)") == ["np.load(p, allow_pickle=True)"]
