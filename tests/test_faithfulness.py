"""Faithfulness (deletion test, prototype statistics) and the absolute-scale explanation heat maps, on tiny tensors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from protohead.explain.explanations import (
    ImagePrediction,
    evidence_scale,
    explanation_rows,
    plot_explanation,
    upsample_attention,
)
from protohead.explain.faithfulness import deletion_curve, faithfulness_report, prototype_statistics
from protohead.head import HeadOptimal
from protohead.training.loop import SplitInputs

TINY = {"num_classes": 3, "img_feat_dim": 16, "emb_dim": 8, "num_heads": 2, "num_prototypes": 2,
        "max_prototypes": 3}
KEYS = {"deletion_drop_explained", "deletion_drop_random", "deletion_ratio_at_5", "dead_prototype_share",
        "median_push_similarity", "median_prepush_similarity", "never_pushed", "top_prototype_win_share",
        "effective_prototypes", "attention_concentration", "evidence_kind", "images", "k"}


class OneToken(nn.Module):
    """Logits read token ``HOT`` only, and the evidence map says exactly that."""

    HOT = 3

    def forward(self, tokens, pooled, labels=None):
        batch, num_tokens, _ = tokens.shape
        logits = 10.0 * tokens[:, self.HOT, :3]
        evidence = torch.zeros(batch, 3, 1, num_tokens)
        evidence[..., self.HOT] = 1.0
        return logits, None, {"evidence": evidence, "winning_prototype": torch.zeros(batch, 3, dtype=torch.long)}


def tiny_head(**options) -> HeadOptimal:
    torch.manual_seed(0)
    return HeadOptimal(**{**TINY, **options}).eval()


def tiny_split(n: int = 12, num_tokens: int = 16, seed: int = 1) -> SplitInputs:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, num_tokens, TINY["img_feat_dim"], generator=generator)
    pooled = tokens.mean(dim=1)
    labels = torch.arange(n) % TINY["num_classes"]

    def fetch(indices, train):
        return tokens[indices], pooled[indices], labels[indices]

    return SplitInputs(fetch, n, labels.numpy())


def test_deletion_hits_the_one_token_the_logit_reads():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 16, 4, generator=generator)
    tokens[:, OneToken.HOT] += 5.0
    pooled = tokens.mean(dim=1)
    curve = deletion_curve(OneToken(), tokens, pooled, max_k=10, generator=torch.Generator().manual_seed(0))
    explained, random = curve["explained"], curve["random"]
    assert explained.shape == random.shape == (8, 10) and curve["k"] == list(range(1, 11))
    predicted = curve["predicted"]
    expected = 10.0 * (tokens[:, OneToken.HOT] - tokens.mean(dim=1))[torch.arange(8), torch.as_tensor(predicted)]
    np.testing.assert_allclose(explained, expected.double().numpy()[:, None].repeat(10, 1), rtol=1e-5, atol=1e-5)
    assert (explained[:, 0] > 1.0).all() and explained[:, 0].mean() > random[:, 0].mean()
    # a random set either misses the token (no drop) or holds it (the full drop); the sets are nested in k
    hit = np.isclose(random, explained, atol=1e-4)
    assert (hit | np.isclose(random, 0.0, atol=1e-4)).all()
    assert (np.diff(hit.astype(int), axis=1) >= 0).all() and not hit[:, 0].all()
    again = deletion_curve(OneToken(), tokens, pooled, max_k=10, generator=torch.Generator().manual_seed(0),
                           copies_per_pass=7)  # chunking and the seed change nothing
    np.testing.assert_allclose(again["random"], random, atol=1e-6)


def test_deletion_of_the_argmax_token_beats_random_on_a_patch_head():
    """Max pooling: deleting the winning prototype's best token leaves every other (slot, token) score, while a
    random token other than it leaves the best score itself; both add the same mean token. So, per image, the
    explained drop at k = 1 is at least the random one. (The drop itself can be negative: the mean token may
    match the prototype better than any real token.)"""
    head = tiny_head(scoring="patch", use_attention=False)
    split = tiny_split(n=10)
    tokens, pooled, _ = split.fetch(torch.arange(10), False)
    curve = deletion_curve(head, tokens, pooled, max_k=5, generator=torch.Generator().manual_seed(3))
    assert curve["explained"].shape == (10, 5)
    assert (curve["explained"][:, 0] >= curve["random"][:, 0] - 1e-5).all()
    assert curve["explained"][:, 0].mean() > curve["random"][:, 0].mean()
    _, _, info = head(tokens, pooled)  # the map ranked by is the predicted class's winning prototype's
    rows = torch.arange(10)
    winner = info["winning_prototype"][rows, torch.as_tensor(curve["predicted"])]
    np.testing.assert_allclose(curve["maps"], info["evidence"][rows, torch.as_tensor(curve["predicted"]),
                                                               winner].numpy())


def test_deletion_refuses_a_head_without_evidence_and_bad_k():
    head = tiny_head(use_attention=False)
    split = tiny_split(n=4)
    tokens, pooled, _ = split.fetch(torch.arange(4), False)
    with pytest.raises(ValueError, match="evidence"):
        deletion_curve(head, tokens, pooled)
    with pytest.raises(ValueError, match="max_k"):
        deletion_curve(tiny_head(scoring="patch", use_attention=False), tokens, pooled, max_k=17)
    report = faithfulness_report(head, split, None, 4, split)  # statistics still, deletion entries None
    assert report["deletion_drop_explained"] is None and report["evidence_kind"] is None


@pytest.mark.parametrize("options, kind", [({"scoring": "patch", "use_attention": False}, "similarity"),
                                           ({}, "attention")])
def test_faithfulness_report_keys_and_values(options, kind):
    head = tiny_head(**options)
    split = tiny_split(n=12)
    report = faithfulness_report(head, split, [0, 2, 4, 5, 7], 2, split, ["a", "b", "c"], seed=0)
    assert set(report) >= KEYS and report["evidence_kind"] == kind and report["images"] == 5
    assert report["k"] == list(range(1, 11))
    assert len(report["deletion_drop_explained"]) == len(report["deletion_drop_random"]) == 10
    json.dumps(report, allow_nan=False)
    assert report["median_push_similarity"] is None and report["never_pushed"] == 6  # never pushed: all NaN
    assert 0.0 <= report["dead_prototype_share"] <= 1.0
    assert set(report["top_prototype_win_share"]) == {"a", "b", "c"}
    assert all(0.0 < share <= 1.0 for share in report["top_prototype_win_share"].values())
    if kind == "attention":
        assert 0.0 < report["attention_concentration"] <= 1.0 + 1e-9
    else:
        assert report["attention_concentration"] is None
    same = faithfulness_report(head, split, [0, 2, 4, 5, 7], 3, split, ["a", "b", "c"], seed=0)
    np.testing.assert_allclose(same["deletion_drop_random"], report["deletion_drop_random"], atol=1e-5)


def test_prototype_statistics_count_own_class_wins_and_push_records():
    head = tiny_head(scoring="patch", use_attention=False)
    with torch.no_grad():
        head.bank.push_image[0, 0], head.bank.push_similarity[0, 0] = 4, 0.8
        head.bank.push_image[1, 1], head.bank.push_similarity[1, 1] = 2, 0.6
        head.bank.prepush_similarity[0, 0] = 0.5
    winners = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]])  # (n, C) winning slot per class
    labels = np.array([0, 0, 1, 2])
    stats = prototype_statistics(head, winners, labels, ["a", "b", "c"])
    # own-class wins: a/0 ×2, a/1 ×0, b/1 ×1, b/0 ×0, c/1 ×1, c/0 ×0 → 3 of 6 valid prototypes dead
    assert stats["dead_prototype_share"] == pytest.approx(0.5)
    assert stats["top_prototype_win_share"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert stats["effective_prototypes"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    split = prototype_statistics(head, np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]), np.array([0] * 4))
    shares = np.array([0.25, 0.75])  # class 0: slot 0 wins one image, slot 1 three
    assert split["top_prototype_win_share"]["0"] == pytest.approx(0.75)
    assert split["effective_prototypes"]["0"] == pytest.approx(np.exp(-(shares * np.log(shares)).sum()))
    assert split["effective_prototypes"]["1"] is None  # no image of class 1
    assert stats["never_pushed"] == 4
    assert stats["median_push_similarity"] == pytest.approx(0.6)  # lower middle of (0.6, 0.8)
    assert stats["median_prepush_similarity"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ heat maps
def test_evidence_scales_are_absolute():
    uniform = np.full(49, 1 / 49)
    scale = evidence_scale(uniform, "attention")
    assert scale.vmin == 0.0 and scale.vmax == pytest.approx(2 / 49) and scale.marker == pytest.approx(1 / 49)
    assert "uniform 0.0204" in scale.note and "scale 0–0.0408" in scale.note
    peaked = np.r_[0.5, np.full(48, 0.5 / 48)]
    assert evidence_scale(peaked, "attention").vmax == pytest.approx(0.5)
    cosine = np.linspace(-0.2, 0.83, 49)
    scale = evidence_scale(cosine, "similarity", "cosine")
    assert (scale.vmin, scale.vmax) == (0.0, 1.0) and scale.marker == pytest.approx(0.83)
    assert scale.note == "similarity map, scale 0–1, max 0.83"
    assert (evidence_scale(cosine, "similarity", "cosine01").vmin, evidence_scale(cosine, "similarity",
                                                                                  "cosine01").vmax) == (0.0, 1.0)
    scale = evidence_scale(np.linspace(-3.0, -1.0, 49), "similarity", "l2")
    assert (scale.vmin, scale.vmax) == (-3.0, -1.0) and "own range" in scale.note and "l2" in scale.note


@pytest.mark.parametrize("kind, distance", [("attention", None), ("similarity", "cosine")])
def test_each_row_draws_its_own_prototype_map(monkeypatch, tmp_path, kind, distance):
    from protohead.explain import explanations

    grid, n = (3, 3), 9
    generator = torch.Generator().manual_seed(0)
    evidence = torch.rand(2, 2, n, generator=generator).numpy()
    if kind == "attention":
        evidence = evidence / evidence.sum(-1, keepdims=True)
    similarities = np.array([[0.9, 0.7], [0.8, -np.inf]])  # ranked: (0, 0), (1, 0), (0, 1)
    prediction = ImagePrediction(np.array([0.6, 0.4]), 0.2, similarities, evidence, kind, distance)
    rows = explanation_rows(prediction)
    assert [(c, s) for c, s, _, _ in rows] == [(0, 0), (1, 0), (0, 1)]
    for c, s, _, values in rows:
        np.testing.assert_array_equal(values, evidence[c, s])

    captured = {}

    def keep(fig, path):
        captured["fig"] = fig
        return path

    monkeypatch.setattr(explanations, "save_png", keep)
    image = np.zeros((30, 40, 3), np.uint8)
    plot_explanation(image, "img", 0, ["a", "b"], prediction, {}, grid, 24, tmp_path / "x.png")
    fig = captured["fig"]
    heat_axes = [ax for ax in fig.axes if len(ax.images) == 2]
    assert len(heat_axes) == 3
    drawn = [np.asarray(ax.images[1].get_array()) for ax in heat_axes]
    for (c, s, _, _), heat, ax in zip(rows, drawn, heat_axes, strict=True):
        np.testing.assert_allclose(heat, upsample_attention(evidence[c, s], grid, (30, 40)), rtol=1e-6)
        low, high = ax.images[1].get_clim()
        assert low == 0.0 and high == pytest.approx(1.0 if kind == "similarity" else max(evidence[c, s].max(), 2 / n))
        assert ("uniform" if kind == "attention" else "scale 0–1") in ax.get_title()
    assert not np.allclose(drawn[0], drawn[1]) and not np.allclose(drawn[1], drawn[2])
    colour_bars = [ax for ax in fig.axes if ax not in heat_axes and ax.get_xlabel().startswith("--")]
    assert len(colour_bars) == 3
    marker = colour_bars[0].lines[0].get_ydata()[0]
    expected = 1 / n if kind == "attention" else evidence[0, 0].max()
    assert math.isclose(marker, expected, rel_tol=1e-6)
