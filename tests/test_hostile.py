"""Hostile inputs to the head API: every case gives a correct result or a ``ValueError`` naming the problem.

Property-based (hypothesis) over random small heads (C ≤ 5, D ≤ 16, F ≤ 12, N ≤ 6, B ≤ 8; several presets,
distances, attention/mixing modes; ``HeadOptimal``, ``Head`` and a baseline head; train and eval mode):

- ``test_well_formed_inputs``: values drawn from ordinary to huge magnitudes, NaN/±Inf injected at random
  positions, one-class and random label batches → finite (B, C) logits and, with labels, a finite scalar
  loss with finite gradients; otherwise a ``ValueError`` naming NaN/Inf or the magnitude.
- ``test_malformed_inputs``: one defect per example (rank, F, B mismatch, empty batch, N = 0, dtype, non-tensor,
  labels out of range / wrong dtype / wrong shape / missing in training) → ``ValueError`` naming that defect.

Cases tried per full run: 150 + 250 examples (``max_examples``) + 13 explicit cases below = 413.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protohead.baselines import BaselineHead
from protohead.config import preset_config
from protohead.head import Head, HeadOptimal
from protohead.validation import MAX_ABS_FEATURE, check_head_inputs

WELL_FORMED_EXAMPLES = 150
MALFORMED_EXAMPLES = 250
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

PRESETS = ("basic", "long_tail", "uncertainty", "protopnet", "optimalhead", "optimal", "patch")
KINDS = ("HeadOptimal", "Head", "baseline")


@st.composite
def heads(draw: st.DrawFn) -> tuple[torch.nn.Module, str, int, int]:
    """(model, kind, C, F): a small random head."""
    kind = draw(st.sampled_from(KINDS))
    num_classes = draw(st.integers(1, 5))
    feat = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if kind == "baseline":
        counts = draw(st.none() | st.lists(st.integers(0, 50), min_size=num_classes, max_size=num_classes))
        model = BaselineHead(draw(st.sampled_from(("linear", "linear_la", "balanced_softmax", "cosine"))),
                             num_classes, feat, counts)
        return model, kind, num_classes, feat
    num_heads = draw(st.sampled_from((1, 2, 4)))
    emb = num_heads * draw(st.sampled_from((1, 2, 4))) * (2 if num_heads > 1 else 1)  # ≤ 16, divisibility rules
    max_slots = draw(st.integers(1, 3))
    options = {
        "num_classes": num_classes, "img_feat_dim": feat, "emb_dim": emb, "num_heads": num_heads,
        "max_prototypes": max_slots, "num_prototypes": draw(st.integers(1, max_slots)),
        "use_attention": draw(st.booleans()), "attention_scope": draw(st.sampled_from(("full", "class", "auto"))),
        "mixing": draw(st.sampled_from(("sequential", "parallel"))),
        "checkpoint_chunk_slots": draw(st.sampled_from((1, 2048))),  # 1 → class-chunked (+ checkpointed) path
    }
    if draw(st.booleans()):
        options["distance"] = draw(st.sampled_from(("cosine", "l2", "log_activation")))
    if draw(st.booleans()):
        options["class_counts"] = tuple(draw(st.lists(st.integers(0, 50), min_size=num_classes,
                                                      max_size=num_classes)))
    cls = Head if kind == "Head" else HeadOptimal
    preset = draw(st.sampled_from(PRESETS))
    patch = preset_config(preset)
    if patch.scoring == "patch":  # patch scoring has no attention block; soft pooling needs a cosine
        options["use_attention"] = False
        if patch.patch_pooling == "soft":
            options.pop("distance", None)
    model = cls(preset=preset, **options)
    return model, kind, num_classes, feat


MAGNITUDES = (0.0, 1e-30, 1e-3, 1.0, 30.0, 1e4, MAX_ABS_FEATURE, 1e12, 1e20, 3e38)


def call(model: torch.nn.Module, kind: str, pool, img, labels):
    """(logits, loss) for every head kind."""
    out = model(pool, img, labels)  # Head: (logits, loss); HeadOptimal and baselines: (logits, loss, info)
    assert len(out) == (2 if kind == "Head" else 3)
    return out[0], out[1]


@settings(max_examples=WELL_FORMED_EXAMPLES, **SETTINGS)
@given(head=heads(), data=st.data())
def test_well_formed_inputs(head, data):
    model, kind, num_classes, feat = head
    batch, tokens = data.draw(st.integers(1, 8), "B"), data.draw(st.integers(1, 6), "N")
    scale = data.draw(st.sampled_from(MAGNITUDES), "scale")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    pool = torch.randn(batch, tokens, feat, generator=g) * scale
    img = torch.randn(batch, feat, generator=g) * scale
    if data.draw(st.booleans(), "img as (B, 1, F)"):
        img = img[:, None]
    poison = data.draw(st.sampled_from((None, float("nan"), float("inf"), float("-inf"))), "poison")
    if poison is not None:
        target = data.draw(st.sampled_from((pool, img)), "poisoned tensor")
        flat = target.view(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), "position")] = poison
    labels_kind = data.draw(st.sampled_from(("random", "one_class", "none")), "labels")
    if labels_kind == "random":
        labels = torch.randint(0, num_classes, (batch,), generator=g)
    elif labels_kind == "one_class":
        labels = torch.full((batch,), data.draw(st.integers(0, num_classes - 1), "class"), dtype=torch.long)
    else:
        labels = None
    if labels is not None:
        labels = labels.to(data.draw(st.sampled_from((torch.int64, torch.int32, torch.uint8)), "label dtype"))
    train = data.draw(st.booleans(), "train")
    model.train(train)
    finite = bool(torch.isfinite(pool).all() and torch.isfinite(img).all())
    too_big = finite and max(float(pool.abs().max()), float(img.abs().max())) > MAX_ABS_FEATURE

    if train and labels is None:
        with pytest.raises(ValueError, match="labels are required"):
            call(model, kind, pool, img, labels)
        return
    if not finite:
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(model, kind, pool, img, labels)
        return
    if too_big:
        with pytest.raises(ValueError, match="magnitude"):
            call(model, kind, pool, img, labels)
        return
    logits, loss = call(model, kind, pool, img, labels)
    assert logits.shape == (batch, num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all(), logits
    if labels is None:
        assert loss is None
        return
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    if train:
        assert loss.requires_grad and loss.grad_fn is not None
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads, "the loss reaches no parameter"
        assert all(torch.isfinite(grad).all() for grad in grads)


DEFECTS = {  # name -> expected message fragment
    "pool rank 2": "pool_features must have shape", "pool rank 4": "pool_features must have shape",
    "img rank 1": "img_features must have shape", "img rank 3": "img_features must have shape",
    "pool F": "pool_features feature size", "img F": "img_features feature size",
    "batch mismatch": "batch sizes differ", "empty batch": "empty batch", "no tokens": "no tokens",
    "pool dtype": "pool_features", "img dtype": "img_features", "pool numpy": "must be a torch.Tensor",
    "img list": "must be a torch.Tensor", "label high": "labels out of range", "label negative": "labels out of range",
    "label float": "labels must be an integer tensor", "label bool": "labels must be an integer tensor",
    "label list": "labels must be an integer tensor", "label shape (B, 1)": "labels must have shape",
    "label shape (B+1,)": "labels must have shape", "label scalar": "labels must have shape",
    "no labels in training": "labels are required",
}
BAD_DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool,
              torch.complex64)


@settings(max_examples=MALFORMED_EXAMPLES, **SETTINGS)
@given(head=heads(), data=st.data())
def test_malformed_inputs(head, data):
    model, kind, num_classes, feat = head
    batch, tokens = data.draw(st.integers(1, 8), "B"), data.draw(st.integers(1, 6), "N")
    pool, img = torch.randn(batch, tokens, feat), torch.randn(batch, feat)
    labels: object = torch.randint(0, num_classes, (batch,))
    train = data.draw(st.booleans(), "train")
    defect = data.draw(st.sampled_from(sorted(DEFECTS)), "defect")
    other = data.draw(st.integers(1, 3), "offset")
    if defect == "pool rank 2":
        pool = pool[:, 0]
    elif defect == "pool rank 4":
        pool = pool[:, None]
    elif defect == "img rank 1":
        img = img[0]
    elif defect == "img rank 3":
        img = img[:, None].expand(batch, other + 1, feat)
    elif defect == "pool F":
        pool = torch.randn(batch, tokens, feat + other)
    elif defect == "img F":
        img = torch.randn(batch, feat + other)
    elif defect == "batch mismatch":
        img = torch.randn(batch + other, feat)
    elif defect == "empty batch":
        pool, img, labels = pool[:0], img[:0], labels[:0]
    elif defect == "no tokens":
        pool = pool[:, :0]
    elif defect in ("pool dtype", "img dtype"):
        dtype = data.draw(st.sampled_from(BAD_DTYPES), "dtype")
        if defect == "pool dtype":
            pool = pool.to(dtype)
        else:
            img = img.to(dtype)
    elif defect == "pool numpy":
        pool = pool.numpy()
    elif defect == "img list":
        img = img.tolist()
    elif defect == "label high":
        labels[data.draw(st.integers(0, batch - 1), "at")] = num_classes + other - 1
    elif defect == "label negative":
        labels[data.draw(st.integers(0, batch - 1), "at")] = -other
    elif defect == "label float":
        labels = labels.float()
    elif defect == "label bool":
        labels = labels.bool()
    elif defect == "label list":
        labels = labels.tolist()
    elif defect == "label shape (B, 1)":
        labels = labels[:, None]
    elif defect == "label shape (B+1,)":
        labels = torch.zeros(batch + other, dtype=torch.long)
    elif defect == "label scalar":
        labels = labels[0]
    elif defect == "no labels in training":
        labels, train = None, True
    model.train(train)
    with pytest.raises(ValueError, match=DEFECTS[defect]) as caught:
        call(model, kind, pool, img, labels)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------- explicit cases
def small_head(preset: str = "basic", **options) -> HeadOptimal:
    torch.manual_seed(0)
    return HeadOptimal(preset=preset, **{"num_classes": 3, "img_feat_dim": 6, "emb_dim": 8, "num_heads": 2,
                                         "num_prototypes": 2, "max_prototypes": 3, **options})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_wrong_float_dtype_says_how_to_cast(dtype):
    head = small_head().eval()
    with pytest.raises(ValueError, match=r"dtype .* but the head computes in torch.float32; cast"):
        head(torch.randn(2, 4, 6).to(dtype), torch.randn(2, 6).to(dtype))


def test_explicit_head_dtype_is_honoured():
    pool, img = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    assert check_head_inputs(pool, img, None, 6, 3, dtype=torch.float64).shape == (2, 6)
    with pytest.raises(ValueError, match="float64"):
        check_head_inputs(pool.float(), img.float(), None, 6, 3, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_work_under_autocast(dtype):
    head = small_head().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss, _ = head(torch.randn(4, 4, 6).to(dtype), torch.randn(4, 6).to(dtype), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)


@pytest.mark.parametrize("preset", ["basic", "optimal", "protopnet", "optimalhead"])
def test_single_sample_single_class_training_step(preset):
    head = small_head(preset=preset).train()
    _, loss, info = head(torch.randn(1, 1, 6), torch.randn(1, 6), torch.tensor([2]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in info.values() if isinstance(v, torch.Tensor))


def test_numpy_features_name_the_argument():
    head = small_head().eval()
    with pytest.raises(ValueError, match=r"img_features must be a torch\.Tensor, got ndarray"):
        head(torch.randn(2, 4, 6), np.zeros((2, 6), dtype=np.float32))


def test_inputs_are_not_modified():
    head = small_head().train()
    pool, img, labels = torch.randn(3, 4, 6), torch.randn(3, 1, 6), torch.tensor([0, 0, 1], dtype=torch.int32)
    copies = pool.clone(), img.clone(), labels.clone()
    head(pool, img, labels)[1].backward()
    assert all(torch.equal(a, b) for a, b in zip((pool, img, labels), copies, strict=True))


def test_magnitude_bound_message_names_the_tensor():
    head = small_head().eval()
    with pytest.raises(ValueError, match="pool_features has values of magnitude 1e\\+20"):
        head(torch.full((1, 2, 6), 1e20), torch.ones(1, 6))
