"""Issue 9 on a tiny real run (HAM10000 images, Lite0 features): the selected checkpoint's prototypes are their
source patches, and explain predicts what the metrics report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protohead.runconfig import load_run_config

PER_CLASS = 8


@pytest.fixture(scope="module")
def patch_run(ham10000_root, feature_cache, tmp_path_factory) -> Path:
    from protohead.pipeline import run

    run_dir = tmp_path_factory.mktemp("faithful") / "run"
    config = load_run_config(overrides=[
        f"data={ham10000_root}", f"cache_dir={feature_cache}", f"subset_per_class={PER_CLASS}", "progress=false",
        "batch_size=16", "head.emb_dim=32", "head.num_heads=4", "head.scoring=patch", "head.use_attention=false",
        "head.patch_pooling=soft", "epochs=3", "push_every=1", "expand_every=2", "anchored_epochs=2"])
    run(config, run_dir)
    return run_dir


def test_selected_prototypes_score_their_source_patch_with_their_push_similarity(patch_run):
    from protohead import runfolder
    from protohead.pipeline import prepare

    loaded = runfolder.load_model(patch_run)
    head = loaded.model.eval()
    best = json.loads((patch_run / "history.json").read_text())["best"]
    assert "final_push" in best and best["final_push"]["pushed"] > 0
    assert bool(head.bank.anchored) and head.bank.is_anchored
    valid = head.bank.valid
    assert int((head.push_image[valid] < 0).sum()) == 0  # never_pushed = 0 in the selected checkpoint
    train = prepare(loaded.config).splits["train"]
    for c, k in valid.nonzero().tolist():
        image = int(head.push_image[c, k])
        tokens, pooled, labels = train.fetch(torch.tensor([image]), False)
        assert int(labels[0]) == c
        _, _, info = head(tokens, pooled)
        token_map = info["evidence"][0, c, k]
        assert int(token_map.argmax()) == int(head.push_token[c, k])
        assert float(token_map.max()) == pytest.approx(float(head.push_similarity[c, k]), abs=1e-4)
        assert float(head.push_similarity[c, k]) == pytest.approx(1.0, abs=1e-4)  # the prototype is that patch


def test_explain_predicts_the_class_the_metrics_report_for_every_test_image(patch_run):
    from protohead.explain.run import _outputs, load_model, read_run_config

    config = read_run_config(patch_run)
    data, model, selection = load_model(patch_run, config)
    test = data.splits["test"]
    counts = np.bincount(data.splits["train"].labels, minlength=len(data.class_names))
    outputs = _outputs(model, test, range(test.size), 64, False, counts, selection)
    stored = np.load(patch_run / "predictions_test.npz")
    assert selection.get("posthoc_tau", 0.0) is not None
    np.testing.assert_array_equal(outputs["probabilities"].argmax(1), stored["probabilities"].argmax(1))
    np.testing.assert_allclose(outputs["probabilities"], stored["probabilities"], atol=1e-5)
