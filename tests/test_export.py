"""Deployment export (:mod:`protohead.export`): backbone + head → ONNX / TorchScript, run, compare to PyTorch.

Every exported model is traced on a batch of 1 and run on a batch of 2 *other* images (dynamic batch axis);
its logits must match the eager PyTorch logits within 1e-4 (max abs difference).
"""

from __future__ import annotations

import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from protohead.baselines import BaselineHead
from protohead.export import (
    DeployModel,
    export_model,
    load_exported,
    prior_logit_shift,
    read_export_metadata,
    run_exported,
)
from protohead.head import HeadOptimal
from protohead.posthoc import adjust_probabilities
from protohead.validation import is_tracing

FEATURES = 24
IMAGE_SIZE = 32
TOLERANCE = 1e-4
FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


class TinyBackbone(nn.Module):
    """A small conv net with the backbone contract: (B, 3, S, S) → tokens (B, (S/8)², F), pooled (B, F)."""

    def __init__(self, feature_dim: int = FEATURES, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, feature_dim, 3, stride=2, padding=1), nn.ReLU6())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) → ((B, N, F) row-major tokens, (B, F) mean of tokens)."""
        tokens = self.net(images).flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1)


class BatchDependentBackbone(TinyBackbone):
    """Multiplies the features by the batch size as a Python int: a trace bakes in the traced batch."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled = super().forward(images)
        scale = float(int(images.shape[0]))
        return tokens * scale, pooled * scale


def make_head(kind: str, num_classes: int = 3) -> nn.Module:
    """A small head: a HeadOptimal preset or a baseline (``linear``)."""
    if kind == "linear":
        return BaselineHead("linear", num_classes, FEATURES, class_counts=[30, 10, 5][:num_classes])
    return HeadOptimal(preset=kind, num_classes=num_classes, img_feat_dim=FEATURES, emb_dim=32, num_heads=4,
                       max_prototypes=4, num_prototypes=3)


def make_model(kind: str = "basic", logit_shift: torch.Tensor | None = None, seed: int = 0) -> DeployModel:
    torch.manual_seed(seed)
    backbone = TinyBackbone()
    with torch.no_grad():  # non-trivial batch-norm statistics
        backbone.net[1].running_mean.uniform_(-0.5, 0.5)
        backbone.net[1].running_var.uniform_(0.5, 2.0)
    return DeployModel(backbone, make_head(kind), logit_shift=logit_shift)


def images(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 123) -> torch.Tensor:
    """(B, 3, S, S) preprocessed-looking float32 images, unlike the export's own trace example."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator) * 1.5 + 0.2


def eager_logits(model: DeployModel, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["basic", "uncertainty", "linear"])
def test_exported_logits_match_pytorch(tmp_path, kind: str, fmt: str) -> None:
    model = make_model(kind)
    path = export_model(model, tmp_path / f"model{SUFFIX[fmt]}", fmt, IMAGE_SIZE, batch_size=1)
    assert path == tmp_path / f"model{SUFFIX[fmt]}" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    x = images(batch=2)
    expected = eager_logits(model, x)
    got = run_exported(path, x.numpy())
    assert got.shape == (2, 3) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got[:1] - run_exported(path, x[:1].numpy())).max() <= TOLERANCE  # batch of 1 as well
    metadata = read_export_metadata(path)
    assert metadata["format"] == fmt and metadata["image_size"] == IMAGE_SIZE and metadata["num_classes"] == 3
    assert metadata["logit_shift"] is None and 0 <= metadata["verified_max_abs_diff"] <= TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
def test_logit_shift_is_the_posthoc_prior_adjustment(tmp_path, fmt: str) -> None:
    counts, tau = [30, 10, 5], 0.7
    shift = prior_logit_shift(counts, tau)
    shifted, plain = make_model("uncertainty", logit_shift=shift), make_model("uncertainty")
    assert torch.equal(shifted.logit_shift, shift) and plain.logit_shift is None
    path = export_model(shifted, tmp_path / f"shifted{SUFFIX[fmt]}", fmt, IMAGE_SIZE, batch_size=3,
                        metadata={"class_names": ["a", "b", "c"], "tau": tau})
    x = images(batch=2, seed=7)
    got = run_exported(path, x.numpy())
    head_logits = eager_logits(plain, x)  # same seed → same weights
    assert np.abs(got - eager_logits(shifted, x)).max() <= TOLERANCE
    assert np.abs(got - (head_logits + shift.numpy())).max() <= TOLERANCE
    probabilities = torch.from_numpy(head_logits).double().softmax(-1).numpy()
    adjusted = torch.from_numpy(got).double().softmax(-1).numpy()
    np.testing.assert_allclose(adjusted, adjust_probabilities(probabilities, counts, tau), atol=1e-5)
    metadata = read_export_metadata(path)
    assert metadata["class_names"] == ["a", "b", "c"] and metadata["tau"] == tau
    np.testing.assert_allclose(metadata["logit_shift"], shift.numpy(), rtol=1e-6)
    assert np.all(prior_logit_shift(counts, 0.0).numpy() == 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_features_rounds_inside_the_graph(tmp_path, fmt: str) -> None:
    """``round_features`` (frozen-feature runs, as ``protohead predict``) rounds tokens/pooled to float16 in
    the graph. ONNX vs PyTorch can then differ by one float16 step of a feature that sits on a rounding
    boundary (backbone outputs differ by ~1e-7), so ONNX gets a looser bound; TorchScript stays exact."""
    torch.manual_seed(0)
    rounded = make_model("basic")
    rounded.round_features = True
    x = images(batch=2, seed=5)
    expected = eager_logits(rounded, x)
    rounded.round_features = False
    assert np.abs(expected - eager_logits(rounded, x)).max() > 0  # rounding changes the logits
    model = DeployModel(rounded.backbone, rounded.head, round_features=True)
    path = export_model(model, tmp_path / f"r{SUFFIX[fmt]}", fmt, IMAGE_SIZE)
    assert read_export_metadata(path)["round_features"] is True
    bound = TOLERANCE if fmt == "torchscript" else 2e-3
    assert np.abs(run_exported(path, x.numpy()) - expected).max() <= bound


@pytest.mark.slow
def test_efficientnet_lite0_backbone_exports(tmp_path) -> None:
    from protohead.backbones import build_backbone

    size = 64
    backbone = build_backbone("efficientnet_lite0", size)
    torch.manual_seed(0)
    head = HeadOptimal(preset="basic", num_classes=3, img_feat_dim=backbone.feature_dim, emb_dim=32, num_heads=4)
    model = DeployModel(backbone, head, logit_shift=prior_logit_shift([50, 20, 5], 0.5))
    rng = np.random.default_rng(0)
    x = backbone.preprocess([rng.integers(0, 256, (48 + 10 * k, 80, 3), dtype=np.uint8) for k in range(2)])
    expected = eager_logits(model, x)
    for fmt in FORMATS:
        path = export_model(model, tmp_path / f"lite0{SUFFIX[fmt]}", fmt, size)
        got = run_exported(path, x.numpy())
        assert np.abs(got - expected).max() <= TOLERANCE, fmt
    with pytest.raises(ValueError, match="image_size=96 differs from the backbone's image_size=64"):
        export_model(model, tmp_path / "wrong.onnx", "onnx", 96)


def test_loaded_model_runs_repeatedly_and_checks_images(tmp_path) -> None:
    model = make_model("basic")
    path = export_model(model, tmp_path / "m.onnx", "onnx", IMAGE_SIZE)
    run = load_exported(path)
    x = images(batch=4, seed=3)
    np.testing.assert_allclose(run(x.numpy().astype(np.float64)), eager_logits(model, x), atol=TOLERANCE)
    with pytest.raises(ValueError, match="exported for 32x32"):
        run(images(batch=2, size=40).numpy())
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        run(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="floating point"):
        run(np.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        run(np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32))


def test_export_keeps_the_model_mode_and_checks_arguments(tmp_path) -> None:
    model = make_model("basic")
    model.train()
    export_model(model, tmp_path / "m.pt", "torchscript", IMAGE_SIZE)
    assert model.training and model.head.training
    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of onnx, torchscript"):
        export_model(model, tmp_path / "m.tflite", "tflite", IMAGE_SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        export_model(model, tmp_path / "m.pt", "torchscript", IMAGE_SIZE, batch_size=0)
    with pytest.raises(ValueError, match="image_size=64 differs"):
        export_model(model, tmp_path / "m.pt", "torchscript", 64)
    with pytest.raises(ValueError, match="expects a DeployModel"):
        export_model(model.head, tmp_path / "m.pt", "torchscript", IMAGE_SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON-serialisable"):
        export_model(model, tmp_path / "m.pt", "torchscript", IMAGE_SIZE, metadata={"bad": object()})
    with pytest.raises(ValueError, match=r"logit_shift must have shape \(3,\)"):
        DeployModel(TinyBackbone(), make_head("basic"), logit_shift=torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        DeployModel(TinyBackbone(), make_head("basic"), logit_shift=torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="tau must be finite and >= 0"):
        prior_logit_shift([1, 2, 3], -1.0)


def test_missing_and_bad_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_exported(tmp_path / "absent.onnx", images().numpy())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_export_metadata(tmp_path)  # a folder is not a model file
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\x00\x01")
    with pytest.raises(ValueError, match=r"garbage\.onnx is not an ONNX or TorchScript model"):
        run_exported(garbage, images().numpy())
    fake_zip = tmp_path / "fake.pt"
    with zipfile.ZipFile(fake_zip, "w") as archive:
        archive.writestr("hello.txt", "not torchscript")
    with pytest.raises(ValueError, match=r"fake\.pt is not a TorchScript model"):
        run_exported(fake_zip, images().numpy())


def test_missing_onnx_packages_are_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(ValueError, match=r"needs onnxruntime, which is not installed.*protohead\[export\]"):
        export_model(make_model("linear"), tmp_path / "m.onnx", "onnx", IMAGE_SIZE)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ValueError, match="needs onnx and onnxruntime, which are not installed"):
        export_model(make_model("linear"), tmp_path / "m.onnx", "onnx", IMAGE_SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_trace_that_does_not_generalise_is_refused_and_writes_nothing(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    model = DeployModel(BatchDependentBackbone(), make_head("linear"))
    target = tmp_path / f"m{SUFFIX[fmt]}"
    target.write_bytes(b"previous export")
    with pytest.raises(ValueError, match=f"exported {fmt} model does not reproduce PyTorch"):
        export_model(model, target, fmt, IMAGE_SIZE)
    assert target.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == [target.name]


def test_head_traces_without_host_value_checks() -> None:
    """torch.export used to fail on check_head_inputs' ``.tolist()``; eager calls still check values."""
    assert not is_tracing(torch.zeros(1))
    model = make_model("uncertainty")
    x = images(batch=2)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes={"images": {0: batch}})
    y = images(batch=3, seed=11)
    with torch.no_grad():
        assert (program.module()(y) - model(y)).abs().max().item() <= TOLERANCE
    tokens, pooled = model.backbone(x)
    tokens = tokens.detach().clone()
    tokens[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pool_features contains NaN or Inf"):
        model.head(tokens, pooled.detach())
