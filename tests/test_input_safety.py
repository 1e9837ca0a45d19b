"""Hostile or merely unusual inputs (issue 13, "Nothing lost, ever"): every one is refused early with a
one-line ``ValueError`` naming the file or config key, or — where it is harmless — accepted.

- decompression bombs and forged image headers (``max_image_pixels``);
- out-of-range and non-finite config values, caught when the config is built;
- non-UTF-8 / byte-order-marked CSV and YAML files, and config files that are empty or carry python tags;
- checkpoint file permissions, and checkpoints without their sha256.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
import shutil
import stat
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from protohead.data import DEFAULT_MAX_IMAGE_PIXELS, DERMAMNIST_CLASSES, load_dataset, load_ham10000
from protohead.data.base import FileLoader, read_rgb
from protohead.data.medmnist import load_medmnist_npz
from protohead.runconfig import RunConfig, load_run_config
from protohead.training.checkpoint import (
    CHECKSUM_KEY,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

# ------------------------------------------------------------------------------------------------ helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, rows: int | None = None) -> bytes:
    """A black 1-bit grayscale PNG whose header says ``width`` × ``height``, with ``rows`` rows of pixel
    data (default: all, a genuine image; fewer: a forged header). Zeros compress ~1000:1, so a genuine
    10000×10000 image is a ~12 KB file."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def forge_jpeg_size(path: Path, width: int, height: int) -> None:
    """Rewrite the frame header (SOFn) of the JPEG at ``path`` to claim ``width`` × ``height``."""
    data = bytearray(path.read_bytes())
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, "not a JPEG segment"
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            path.write_bytes(bytes(data))
            return
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise AssertionError(f"no frame header in {path}")


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image's pixel data is decoded (the size check must come first)."""
    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded {self.size} pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def tiny_ham(ham10000_root: Path, tmp_path: Path) -> Path:
    """A tmp HAM10000 folder of 9 real JPEGs (copied): one train image per class, one val, one test."""
    split_rows = _rows(ham10000_root / "dermamnist_split.csv")
    chosen = [next(r for r in split_rows if r["dx"] == dx and r["split"] == "train") for dx in DERMAMNIST_CLASSES]
    for name in ("val", "test"):
        row = next(r for r in split_rows if r["split"] == name)
        chosen.append({**row, "index_in_split": "0"})
    ids = {r["image_id"] for r in chosen}
    root = tmp_path / "ham"
    (root / "images").mkdir(parents=True)
    for image_id in ids:
        shutil.copy(ham10000_root / "images" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
    _write(root / "HAM10000_metadata.csv",
           [r for r in _rows(ham10000_root / "HAM10000_metadata.csv") if r["image_id"] in ids])
    _write(root / "dermamnist_split.csv", chosen)
    return root


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------- 4. decompression bombs


def test_forged_png_header_of_60000x60000_is_one_value_error(tmp_path: Path, no_decoding: None) -> None:
    """Pillow raises DecompressionBombError (not an OSError) at open: it used to escape as a traceback."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(60000, 60000, rows=1))
    assert path.stat().st_size < 1000
    with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
        read_rgb(str(path))
    message = one_line(caught)
    assert "3600000000" in message.replace(",", "") and "max_image_pixels" in message
    with pytest.raises(ValueError, match=re.escape(str(path))):
        FileLoader([str(path)])(0)


def test_genuine_10000x10000_png_is_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    """100 Mpx is over Pillow's warning threshold only: it used to warn (no file named) and decode 300 MB."""
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(10000, 10000))
    assert path.stat().st_size < 50_000
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
            read_rgb(str(path))
    assert not [w for w in caught_warnings if issubclass(w.category, Image.DecompressionBombWarning)]
    message = one_line(caught)
    assert "10000×10000" in message and f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in message
    assert "max_image_pixels" in message  # how to raise it


def test_pixel_limit_is_configurable_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    path.write_bytes(png_bytes(3000, 2000))  # 6 Mpx, genuine
    assert read_rgb(str(path), max_pixels=6_000_000).shape == (2000, 3000, 3)
    with pytest.raises(ValueError, match=r"3000×2000 = 6,000,000 pixels, over the limit of 5,999,999"):
        read_rgb(str(path), max_pixels=5_999_999)
    loader = pickle.loads(pickle.dumps(FileLoader([str(path)], max_pixels=123)))
    assert loader.max_pixels == 123
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_image_pixels"):
            FileLoader([str(path)], max_pixels=bad)  # type: ignore[arg-type]


def test_load_dataset_passes_the_limit_to_class_folders(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(10):
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(np.full((6, 8, 3), i, dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "0.png").write_bytes(png_bytes(2000, 1000))  # 2 Mpx

    def load_big(dataset_kwargs: dict[str, int]) -> np.ndarray:
        dataset = load_dataset(tmp_path, **dataset_kwargs)
        split = next(s for s in dataset.splits.values() if "a/0.png" in s.ids)
        return split.load(split.ids.index("a/0.png"))

    assert load_big({}).shape == (1000, 2000, 3)  # under the default
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "a" / "0.png"))):
        load_big({"max_image_pixels": 1_000_000})
    with pytest.raises(ValueError, match="max_image_pixels must be an integer ≥ 1, got 0"):
        load_dataset(tmp_path, max_image_pixels=0)


@pytest.mark.parametrize(("width", "height"), [(60000, 60000), (10000, 10000)])
def test_forged_jpeg_header_in_ham10000(tiny_ham: Path, no_decoding: None, width: int, height: int) -> None:
    split = load_ham10000(tiny_ham).splits["train"]
    assert split.sources is not None
    victim = Path(split.sources[2])
    forge_jpeg_size(victim, width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(victim) as image:
                assert image.size == (width, height)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    dataset = load_dataset(tiny_ham)
    with pytest.raises(ValueError, match=re.escape(str(victim))) as caught:
        dataset.splits["train"].load(2)
    one_line(caught)


def test_ham10000_limit_flows_from_load_dataset(tiny_ham: Path) -> None:
    split = load_dataset(tiny_ham, max_image_pixels=200 * 150).splits["train"]
    assert split.load(0).shape == (150, 200, 3)
    split = load_dataset(tiny_ham, max_image_pixels=200 * 150 - 1).splits["train"]
    with pytest.raises(ValueError, match=r"200×150 = 30,000 pixels, over the limit of 29,999"):
        split.load(0)


def test_medmnist_respects_the_limit(tmp_path: Path) -> None:
    arrays = {}
    for s, n in (("train", 14), ("val", 7), ("test", 7)):
        arrays[f"{s}_images"] = np.zeros((n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = np.arange(n) % 7
    path = tmp_path / "derma.npz"
    np.savez(path, **arrays)
    assert len(load_dataset(path, max_image_pixels=784).splits["train"]) == 14
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*28×28 = 784 pixels"):
        load_medmnist_npz(path, max_image_pixels=783)


# --------------------------------------------------------------------------- 9. config values, at config time


@pytest.mark.parametrize(("override", "key"), [
    ("subset_per_class=0", "subset_per_class"),
    ("subset_per_class=-1", "subset_per_class"),
    ("eval_batch_size=0", "eval_batch_size"),
    ("batch_size=0", "batch_size"),
    ("epochs=0", "epochs"),
    ("image_size=16", "image_size"),
    ("finetune_image_size=31", "finetune_image_size"),
    ("push_every=-1", "push_every"),
    ("expand_every=-1", "expand_every"),
    ("warmup_epochs=-1", "warmup_epochs"),
    ("weight_decay=-0.1", "weight_decay"),
    ("weight_decay=inf", "weight_decay"),
    ("expand_min_fraction=0", "expand_min_fraction"),
    ("expand_min_fraction=1.5", "expand_min_fraction"),
    ("expand_min_fraction=nan", "expand_min_fraction"),
    ("lr=inf", "lr"),
    ("lr=nan", "lr"),
    ("lr=.inf", "lr"),
    ("lr=-1", "lr"),
    ("backbone_lr=nan", "backbone_lr"),
    ("posthoc_tau=nan", "posthoc_tau"),
    ("posthoc_tau=-inf", "posthoc_tau"),
    ("posthoc_accuracy_tolerance=nan", "posthoc_accuracy_tolerance"),
    ("seed=-1", "seed"),
    ("max_image_pixels=0", "max_image_pixels"),
])
def test_bad_values_are_refused_at_config_time_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError) as caught:
        load_run_config(None, [override])
    message = one_line(caught)
    assert f"'{key}'" in message
    value = override.split("=", 1)[1].lstrip(".")
    assert value in message, message


def test_edge_values_are_accepted_and_old_messages_kept() -> None:
    config = load_run_config(None, ["subset_per_class=1", "eval_batch_size=1", "push_every=0", "expand_every=0",
                                    "warmup_epochs=0", "weight_decay=0", "expand_min_fraction=1",
                                    "head.logit_adjustment=0", "posthoc_tau=0", "finetune_image_size=32",
                                    "max_image_pixels=1"])
    assert config.subset_per_class == 1 and config.max_image_pixels == 1
    assert RunConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="epochs and batch_size must be ≥ 1"):  # as test_cli_errors expects
        load_run_config(None, ["epochs=0"])
    with pytest.raises(ValueError, match="learning rates must be positive"):
        load_run_config(None, ["lr=-1"])


# ------------------------------------------------------------------------ 10. encodings, config-file shapes


def test_csv_with_byte_order_mark_loads(tiny_ham: Path) -> None:
    """Excel writes UTF-8 with a BOM: the first column used to read as '\\ufefflesion_id'."""
    for name in ("HAM10000_metadata.csv", "dermamnist_split.csv"):
        _write(tiny_ham / name, _rows(tiny_ham / name), encoding="utf-8-sig")
        assert (tiny_ham / name).read_bytes().startswith(b"\xef\xbb\xbf")
    dataset = load_ham10000(tiny_ham)
    assert [len(s) for s in dataset.splits.values()] == [7, 1, 1]


@pytest.mark.parametrize("name", ["HAM10000_metadata.csv", "dermamnist_split.csv"])
def test_latin1_csv_is_one_value_error_naming_the_file(tiny_ham: Path, name: str) -> None:
    path = tiny_ham / name
    rows = _rows(path)
    rows[3][next(iter(rows[3]))] += "ä"  # a non-ASCII byte in line 5
    _write(path, rows, encoding="latin-1")
    with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
        load_ham10000(tiny_ham)
    message = one_line(caught)
    assert "UTF-8" in message and "line 5" in message and "0xe4" in message


def test_malformed_csv_names_the_file(tiny_ham: Path) -> None:
    """csv.Error (here: a field over the csv module's size limit) is not a ValueError; it must become one."""
    path = tiny_ham / "HAM10000_metadata.csv"
    lines = path.read_bytes().split(b"\n")
    lines[2] += b',"' + b"x" * 200_000 + b'"'
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ", line 3: malformed CSV") as caught:
        load_ham10000(tiny_ham)
    one_line(caught)


def test_latin1_yaml_config_is_one_value_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("epochs: 2\n# Grüße\nseed: 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
        load_run_config(path)
    message = one_line(caught)
    assert "UTF-8" in message and "line 2" in message


def test_yaml_config_with_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("epochs: 2\nseed: 1\n".encode("utf-8-sig"))
    config = load_run_config(path)
    assert (config.epochs, config.seed) == (2, 1)


def test_empty_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_run_config(path) == RunConfig()  # a user's --config: nothing set
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is empty"):  # a run folder's config.yaml
        load_run_config(path, allow_empty=False)


@pytest.mark.parametrize("text", [
    "!!python/object/apply:os.system ['echo pwned']\n",
    "epochs: !!python/object/apply:os.system ['echo pwned']\n",
    "data: !!python/name:os.system\n",
])
def test_python_tags_in_config_are_one_value_error_naming_the_file(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                                   text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
        load_run_config(path)
    assert "python" in one_line(caught)
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize(("data", "fragment"), [
    (None, "got nothing"),
    (["epochs", 2], "got a list"),
    ("epochs: 2", "got a str"),
    ({1: 2, "zzz": 3}, "unknown config key(s): 1, zzz"),
])
def test_from_dict_refuses_non_mappings(data: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)) as caught:
        RunConfig.from_dict(data)
    one_line(caught)
    with pytest.raises(ValueError, match=re.escape("run/config.yaml: ")):
        RunConfig.from_dict(data, source="run/config.yaml")


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 2\nsubset_per_class: 0\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'subset_per_class' = 0"):
        load_run_config(path)
    path.write_text("epochs: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML") as caught:
        load_run_config(path)
    one_line(caught)


# --------------------------------------------------------------------------------------------- 11. checkpoints


def test_checkpoint_gets_normal_file_permissions(tmp_path: Path) -> None:
    """mkstemp makes 0600 and safetensors' save_file swaps in a new 0600 file: the chmod must come last."""
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "last.safetensors", torch.nn.Linear(2, 2))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        os.umask(0o022)
        save_checkpoint(path, torch.nn.Linear(2, 2))  # over an existing file
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.fixture
def unsigned_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint with its sha256 removed and every weight set to 1 (a forger's edit)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_checkpoint(tmp_path / "best.safetensors", torch.nn.Linear(4, 3), metadata={"epoch": 1})
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert CHECKSUM_KEY in header
    tensors = {k: torch.ones_like(v) if k.startswith("model/") else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={k: v for k, v in header.items() if k != CHECKSUM_KEY})
    return path


def test_checkpoint_without_checksum_warns_naming_the_file(unsigned_checkpoint: Path) -> None:
    with pytest.warns(UnverifiedCheckpointWarning, match=re.escape(str(unsigned_checkpoint))):
        tensors, meta = read_checkpoint(unsigned_checkpoint)
    assert meta["user"] == {"epoch": 1} and bool((tensors["model/weight"] == 1).all())
    model = torch.nn.Linear(4, 3)
    with pytest.warns(UnverifiedCheckpointWarning, match="UNVERIFIED"):
        load_checkpoint(unsigned_checkpoint, model)
    assert bool((model.weight == 1).all())


def test_checkpoint_without_checksum_can_be_refused(unsigned_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(unsigned_checkpoint)) + ".*no sha256") as caught:
        read_checkpoint(unsigned_checkpoint, require_checksum=True)
    one_line(caught)
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=re.escape(str(unsigned_checkpoint))):
        load_checkpoint(unsigned_checkpoint, model, require_checksum=True)
    assert torch.equal(model.weight, before)


def test_signed_checkpoint_loads_without_warning(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "best.safetensors", torch.nn.Linear(4, 3), metadata={"epoch": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_checkpoint(path, require_checksum=True)[1]["user"] == {"epoch": 2}
        assert load_checkpoint(path, torch.nn.Linear(4, 3)) == {"epoch": 2}


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_logit_adjustment_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="logit_adjustment must be finite and >= 0"):
        load_run_config(None, [f"head.logit_adjustment={value}"])


def test_legacy_keys_are_read_under_their_one_name() -> None:
    """``model`` is now ``preset``; ``logit_adjustment_tau`` (linear_la's τ) is ``head.logit_adjustment``."""
    config = RunConfig.from_dict({"model": "linear_la", "logit_adjustment_tau": 0.5})
    assert config.preset == "linear_la" and config.head == {"logit_adjustment": 0.5}
    config = RunConfig.from_dict({"model": "basic", "logit_adjustment_tau": 1.0})  # it never acted on a head
    assert config.preset == "basic" and config.head == {}
    with pytest.raises(ValueError, match="give the preset once"):
        RunConfig.from_dict({"model": "basic", "preset": "basic"})
