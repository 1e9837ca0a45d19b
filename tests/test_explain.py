"""``protohead explain`` on a short real run (real HAM10000 images, real Lite0 features), plus the pure helpers."""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protohead.explain import EXPLANATION_SIZE, ExplainResult, explain_run, gallery_size, read_run_config
from protohead.explain.diagnostics import dead_prototypes, near_duplicates, purity
from protohead.explain.explanations import select_images, upsample_attention
from protohead.explain.gallery import crop, token_box
from protohead.runconfig import load_run_config

PER_CLASS = 8


def config(root: Path, cache: Path, *overrides: str, **fields):
    base = [f"data={root}", f"cache_dir={cache}", f"subset_per_class={PER_CLASS}", "progress=false",
            "batch_size=16", "head.emb_dim=32", "head.num_heads=4"]
    return load_run_config(overrides=[*base, *overrides], **fields)


@pytest.fixture(scope="module")
def explained(ham10000_root, feature_cache, tmp_path_factory) -> ExplainResult:
    from protohead.pipeline import run

    run_dir = tmp_path_factory.mktemp("explain") / "run"
    run(config(ham10000_root, feature_cache, "epochs=2", "push_every=1", "expand_every=0"), run_dir)
    return explain_run(run_dir)


@pytest.fixture(scope="module")
def loaded_head(explained):
    """The run's head rebuilt from its folder alone (no data, no backbone)."""
    from protohead import runfolder

    head = runfolder.load_model(explained.out_dir.parent).model
    return head.eval()


def test_every_valid_prototype_was_pushed_toward_an_image_of_its_class(explained, loaded_head):
    from protohead.pipeline import load_data

    run_dir = explained.out_dir.parent
    train = load_data(read_run_config(run_dir)).splits["train"]
    assert json.loads((run_dir / "train_ids.json").read_text()) == list(train.ids)
    valid = loaded_head.bank.valid
    image, token = loaded_head.push_image, loaded_head.push_token
    for c, k in valid.nonzero().tolist():
        assert 0 <= image[c, k] < len(train), (c, k)
        assert train.labels[int(image[c, k])] == c, (c, k)
        assert 0 <= token[c, k] < 49  # 7×7 Lite0 grid at 224 px
        assert np.isfinite(float(loaded_head.push_similarity[c, k]))
    assert (image[~valid] == -1).all()
    records = explained.diagnostics["push_records"]
    assert len(records) == int(valid.sum()) and all(r["own_class"] for r in records)


def test_gallery_and_explanation_pngs(explained, loaded_head):
    counts = loaded_head.bank.counts.tolist()
    assert len(explained.galleries) == len(counts) == 7
    for c, (name, path) in enumerate(explained.galleries.items()):
        assert path.name == f"gallery_{name}.png" and path.parent == explained.out_dir
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == gallery_size(counts[c])
    assert len(explained.explanations) == 6
    for image_id, path in explained.explanations.items():
        assert path.name == f"explain_{image_id}.png"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == EXPLANATION_SIZE


def test_report_is_self_contained(explained):
    text = explained.report.read_text(encoding="utf-8")
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", text)
    links = re.findall(r"""\bhref\s*=\s*["']?([^"'\s>]*)""", text)
    expected = len(explained.galleries) + len(explained.explanations) + 3  # + confusion, reliability, risk-coverage
    assert len(sources) == expected
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(link.startswith("#") for link in links)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http" not in outside_images and "<link" not in text and "url(" not in text
    assert "attention weights of that prototype" in text and "grid cell" in text


def test_faithfulness_json_and_report_section(explained, loaded_head):
    path = explained.faithfulness_path
    assert path == explained.out_dir / "faithfulness.json" and path.is_file()
    report = json.loads(path.read_text())
    assert report == explained.faithfulness
    assert {"deletion_drop_explained", "deletion_drop_random", "deletion_ratio_at_5", "dead_prototype_share",
            "median_push_similarity", "median_prepush_similarity", "never_pushed", "top_prototype_win_share",
            "attention_concentration", "evidence_kind", "images", "k"} <= set(report)
    assert report["k"] == list(range(1, 11)) and report["evidence_kind"] == loaded_head.evidence_kind
    assert len(report["deletion_drop_explained"]) == len(report["deletion_drop_random"]) == 10
    assert all(isinstance(v, float) for v in report["deletion_drop_explained"] + report["deletion_drop_random"])
    from protohead.pipeline import load_data

    test_size = len(load_data(read_run_config(explained.out_dir.parent)).splits["test"].ids)
    assert report["images"] == test_size and report["never_pushed"] == 0
    assert 0.0 <= report["dead_prototype_share"] <= 1.0 and len(report["top_prototype_win_share"]) == 7
    valid_counts = loaded_head.bank.valid.sum(1).tolist()
    assert all(1.0 - 1e-9 <= e <= k + 1e-9 for e, k in zip(report["effective_prototypes"].values(), valid_counts,
                                                              strict=True))
    assert "effective prototypes" in explained.report.read_text()
    if report["evidence_kind"] == "attention":
        assert 0.0 < report["attention_concentration"] <= 1.0 + 1e-9
    text = explained.report.read_text(encoding="utf-8")
    assert 'id="faithfulness"' in text and "CaBRNet-style perturbation test" in text


def test_diagnostics_flag_a_duplicated_prototype(explained, loaded_head):
    head = copy.deepcopy(loaded_head)
    prototypes, valid = head.bank.prototypes.detach().clone(), head.bank.valid
    assert valid[0, :2].all()
    before = {(p["a"]["class"], p["a"]["slot"], p["b"]["class"], p["b"]["slot"])
              for p in near_duplicates(prototypes, valid)["pairs"]}
    assert (0, 0, 0, 1) not in before
    with torch.no_grad():
        head.bank.prototypes[0, 1] = head.bank.prototypes[0, 0]
    found = near_duplicates(head.bank.prototypes.detach(), valid)
    pair = next(p for p in found["pairs"] if (p["a"]["slot"], p["b"]["slot"], p["a"]["class"]) == (0, 1, 0))
    assert pair["same_class"] and pair["cosine"] > 0.999


def test_dead_prototypes_and_purity_are_in_range(explained, loaded_head):
    diagnostics = json.loads(explained.diagnostics_path.read_text())
    valid = loaded_head.bank.valid
    rows = diagnostics["purity"]["prototypes"]
    assert diagnostics["purity"]["k"] == 50 and len(rows) == int(valid.sum())
    assert all(0.0 <= r["purity"] <= 1.0 for r in rows)
    dead = diagnostics["dead_prototypes"]
    wins = {(w["class"], w["slot"]): w["wins"] for w in dead["wins"]}
    assert {(d["class"], d["slot"]) for d in dead["dead"]} == {key for key, n in wins.items() if n == 0}
    for c in range(valid.shape[0]):  # every val image has exactly one winner per class
        assert sum(n for (cls, _), n in wins.items() if cls == c) == dead["num_images"]


def test_cli_explains_chosen_images_and_names_unknown_ids(explained, capsys):
    from protohead.cli import explain

    run_dir = explained.out_dir.parent
    image_id = next(iter(explained.explanations))
    assert explain.main(argparse.Namespace(verb="explain", run_dir=run_dir, images=[image_id], k=10)) == 0
    assert sorted(p.name for p in explained.out_dir.glob("explain_*.png")) == [f"explain_{image_id}.png"]
    assert "report.html" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    explain.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["explain", str(run_dir), "--images", image_id, "NOT_AN_ID_42"])
    assert args.handler(args) == 2
    assert "NOT_AN_ID_42" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NOT_AN_ID_42"):
        explain.main(args)


# ------------------------------------------------------------------------------------------ pure helpers
def test_token_box_is_the_grid_cell_in_original_pixels():
    assert token_box(0, (7, 7), 224, (450, 600)) == pytest.approx((0, 0, 600 / 7, 450 / 7))
    assert token_box(48, (7, 7), 224, (450, 600)) == pytest.approx((600 * 6 / 7, 450 * 6 / 7, 600, 450))
    x0, y0, x1, y1 = token_box(9, (7, 7), 224, (450, 600))  # row 1, col 2
    assert (x0, y0) == pytest.approx((2 * 600 / 7, 450 / 7)) and x1 - x0 == pytest.approx(600 / 7)
    image = np.zeros((450, 600, 3), np.uint8)
    assert crop(image, (x0, y0, x1, y1)).shape[:2] in {(65, 86), (65, 87), (66, 86), (66, 87)}
    with pytest.raises(ValueError):
        token_box(49, (7, 7), 224, (450, 600))


def test_purity_counts_own_class_neighbours():
    prototypes = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), dim=-1)  # (2, 1, 2)
    valid = torch.ones(2, 1, dtype=torch.bool)
    near0 = torch.tensor([[[1.0, 0.05], [1.0, -0.05]]])  # class-0 image: tokens near prototype 0
    near1 = torch.tensor([[[0.05, 1.0], [-0.05, 1.0]]])
    mixed = torch.tensor([[[1.0, 0.01], [0.01, 1.0]]])  # class-1 image holding one token near prototype 0
    result = purity(prototypes, valid, [(near0, torch.tensor([0])), (near1, torch.tensor([1])),
                                        (mixed, torch.tensor([1]))], k=3)
    values = {(r["class"], r["slot"]): r["purity"] for r in result["prototypes"]}
    assert values[(0, 0)] == pytest.approx(2 / 3) and values[(1, 0)] == pytest.approx(1.0)
    assert purity(prototypes, valid, [(near0, torch.tensor([0]))], k=50)["k"] == 2  # capped at the tokens


def test_dead_prototypes_and_selection_helpers():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    winners = torch.tensor([[0, 0], [0, 0], [0, 0]])
    result = dead_prototypes(winners, valid, np.array([0, 1, 1]))
    assert [(d["class"], d["slot"]) for d in result["dead"]] == [(0, 1)]
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 0, 2, 2])
    assert select_images(labels, predicted, 4) == [0, 3, 4, 1]
    heat = upsample_attention(np.arange(4.0), (2, 2), (8, 10))
    assert heat.shape == (8, 10) and heat.min() >= 0 and heat.max() <= 3


def test_shared_push_sources_are_grouped():
    from protohead.explain.diagnostics import push_records, shared_sources

    valid = torch.tensor([[True, True], [True, False]])
    records = push_records(torch.tensor([[0, 0], [1, -1]]), torch.tensor([[5, 5], [5, -1]]),
                           torch.tensor([[0.9, 0.8], [0.7, float("nan")]]), valid, ["a", "b"], [0, 1], ["x", "y"])
    assert [r["own_class"] for r in records] == [True, True, True]
    groups = shared_sources(records)
    assert groups == [{"image_id": "a", "token": 5, "prototypes": [
        {"class": 0, "class_name": "x", "slot": 0}, {"class": 0, "class_name": "x", "slot": 1}]}]
