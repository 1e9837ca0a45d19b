"""Patch-grounded scoring (issue 9): the shown patch is the evidence in the logit; push, re-seed, final push, prune."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protohead import HeadOptimal, losses
from protohead.bank import PrototypeBank
from protohead.similarity import patch_similarity
from protohead.training.prototypes import (
    coverage,
    dead_prototypes,
    final_push,
    push_prototypes,
    reseed_dead_prototypes,
)

SMALL = {"num_classes": 3, "img_feat_dim": 16, "emb_dim": 8, "num_heads": 2, "num_prototypes": 2,
         "max_prototypes": 4, "scoring": "patch", "use_attention": False}


def loop_patch_similarity(tokens: torch.Tensor, prototypes: torch.Tensor, pooling: str, sharpness: float
                          ) -> torch.Tensor:
    """The definition, one (image, prototype) pair at a time."""
    batch, _, _ = tokens.shape
    num_classes, slots, _ = prototypes.shape
    out = torch.empty(batch, num_classes, slots, dtype=tokens.dtype)
    for b in range(batch):
        unit = F.normalize(tokens[b], dim=-1)
        for c in range(num_classes):
            for m in range(slots):
                sims = unit @ F.normalize(prototypes[c, m], dim=0)
                if pooling == "max":
                    out[b, c, m] = sims.max()
                else:
                    mixture = (torch.softmax(sharpness * sims, dim=0)[:, None] * unit).sum(dim=0)
                    out[b, c, m] = F.cosine_similarity(mixture, prototypes[c, m], dim=0)
    return out


@pytest.mark.parametrize("pooling", ["max", "soft"])
def test_patch_similarity_matches_the_loop_definition(pooling: str) -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    prototypes = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    sim, dist, token_map = patch_similarity(tokens, prototypes, "cosine", pooling, sharpness=4.0)
    torch.testing.assert_close(sim, loop_patch_similarity(tokens, prototypes, pooling, 4.0))
    torch.testing.assert_close(dist, 1.0 - sim)
    assert token_map.shape == (3, 2, 3, 6)
    if pooling == "max":
        torch.testing.assert_close(token_map.amax(dim=-1), sim)


def test_soft_pooling_tends_to_max_and_max_rejects_nothing() -> None:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 7, 4, generator=generator, dtype=torch.float64)
    prototypes = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    hard, _, _ = patch_similarity(tokens, prototypes, "cosine", "max")
    sharp, _, _ = patch_similarity(tokens, prototypes, "cosine", "soft", sharpness=1e4)
    torch.testing.assert_close(sharp, hard, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown patch pooling"):
        patch_similarity(tokens, prototypes, "cosine", "mean")
    with pytest.raises(ValueError, match="cosine"):
        patch_similarity(tokens, prototypes, "l2", "soft")


def test_patch_scoring_logit_depends_on_the_tokens_not_the_pooled_vector() -> None:
    torch.manual_seed(0)
    head = HeadOptimal(**SMALL).eval()
    tokens, pooled = torch.randn(4, 9, 16), torch.randn(4, 16)
    logits, _, info = head(tokens, pooled)
    other_pooled, _, _ = head(tokens, torch.randn(4, 16))
    torch.testing.assert_close(other_pooled, logits)
    changed = tokens.clone()
    best = info["evidence"][0, 0, int(info["winning_prototype"][0, 0])].argmax()
    changed[0, best] = tokens[0].mean(dim=0)
    moved, _, _ = head(changed, pooled)
    assert moved[0, 0] < logits[0, 0]  # deleting the shown patch lowers the logit it explains
    torch.testing.assert_close(moved[1:], logits[1:])  # and nothing else (batch invariance)
    assert head.evidence_kind == "similarity"


def test_patch_scoring_is_batch_invariant_and_trains() -> None:
    torch.manual_seed(0)
    head = HeadOptimal(**SMALL).eval()
    tokens, pooled = torch.randn(5, 9, 16), torch.randn(5, 16)
    together, _, _ = head(tokens, pooled)
    alone = torch.cat([head(tokens[i:i + 1], pooled[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(together, alone)
    head.train()
    _, loss, _ = head(tokens, pooled, torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert head.bank.prototypes.grad is not None and head.bank.prototypes.grad.abs().sum() > 0


def test_patch_scoring_refuses_an_attention_block() -> None:
    with pytest.raises(ValueError, match="use_attention=False"):
        HeadOptimal(**{**SMALL, "use_attention": True})
    with pytest.raises(ValueError, match="cosine"):
        HeadOptimal(**SMALL, patch_pooling="soft", distance="l2")


def _data(seed: int = 0, images: int = 12, tokens: int = 9, features: int = 16):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(images) % 3
    centres = torch.randn(3, features, generator=generator) * 2
    token_values = torch.randn(images, tokens, features, generator=generator) + centres[labels][:, None]
    pooled = token_values.mean(dim=1)

    def batches():
        for start in range(0, images, 5):
            index = torch.arange(start, min(images, start + 5))
            yield index, token_values[index], pooled[index], labels[index]

    return token_values, pooled, labels, batches


def test_final_push_scores_each_prototype_on_its_source_patch_with_its_push_similarity() -> None:
    torch.manual_seed(0)
    head = HeadOptimal(**SMALL)
    tokens, pooled, _, batches = _data()
    report = final_push(head, batches)
    head.eval()
    valid = head.bank.valid
    assert report["pushed"] == int(valid.sum()) + len(report["pruned"])
    assert int((head.push_image[valid] < 0).sum()) == 0  # never_pushed = 0
    for c, k in valid.nonzero().tolist():
        image = int(head.push_image[c, k])
        _, _, info = head(tokens[image:image + 1], pooled[image:image + 1])
        score = float(info["similarities"][0, c, k])
        assert score == pytest.approx(float(head.push_similarity[c, k]), abs=1e-5)
        assert score == pytest.approx(1.0, abs=1e-5)  # projected exactly onto the source token
        assert int(info["evidence"][0, c, k].argmax()) == int(head.push_token[c, k])
    assert report["median_push_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert report["median_prepush_similarity"] <= 1.0


def test_final_push_removes_dead_prototypes_and_keeps_one_per_class() -> None:
    torch.manual_seed(0)
    head = HeadOptimal(**SMALL)
    with torch.no_grad():  # slot 1 of every class duplicates slot 0: after projection it wins nothing
        head.bank.prototypes[:, 1] = head.bank.prototypes[:, 0]
    _, _, _, batches = _data()
    report = final_push(head, batches)
    assert sorted(report["pruned"]) == [(0, 1), (1, 1), (2, 1)]
    assert head.bank.counts.tolist() == [1, 1, 1]
    _, labels, _, _, winners = coverage(head, batches)
    assert not dead_prototypes(head, labels, winners).any()


def test_reseeding_moves_a_dead_prototype_onto_a_real_patch() -> None:
    torch.manual_seed(0)
    head = HeadOptimal(**SMALL)
    tokens, _, labels, batches = _data()
    push_prototypes(head, batches, momentum=0.0)
    with torch.no_grad():
        head.bank.prototypes[0, 1] = -head.bank.prototypes[0, 0]  # points away from every class-0 patch
    _, labels_seen, _, _, winners = coverage(head, batches)
    assert bool(dead_prototypes(head, labels_seen, winners)[0, 1])
    reseeded = reseed_dead_prototypes(head, batches)
    assert (0, 1) in reseeded
    source = int(head.push_image[0, 1])
    assert int(labels[source]) == 0
    assert float(head.push_similarity[0, 1]) == pytest.approx(1.0, abs=1e-5)
    projected = head.eval().project(tokens[source, int(head.push_token[0, 1])])
    torch.testing.assert_close(head.bank.prototypes[0, 1], F.normalize(projected, dim=0))


def test_bank_remove_shifts_values_and_records() -> None:
    bank = PrototypeBank(2, 4, 3, initial=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.push_image[0, :3] = torch.tensor([10, 11, 12])
    kept = bank.prototypes[0, 2].detach().clone()
    bank.remove(0, 1)
    assert bank.counts.tolist() == [2, 3]
    assert bank.push_image[0].tolist() == [10, 12, -1, -1]
    torch.testing.assert_close(bank.prototypes[0, 1], kept)
    bank.remove(0, 0)
    with pytest.raises(ValueError, match="one prototype left"):
        bank.remove(0, 0)


def test_checkpoints_without_prepush_records_still_load() -> None:
    head = HeadOptimal(**SMALL)
    state = head.state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("prepush_similarity")}
    old["bank.push_similarity"] = torch.full_like(state["bank.push_similarity"], 0.25)
    fresh = HeadOptimal(**SMALL)
    fresh.load_state_dict(old)
    assert torch.all(fresh.bank.prepush_similarity == 0.25)


def test_usage_term_enters_the_objective_with_its_scale() -> None:
    """``usage_scale`` adds scale × the prototype-usage term (computed from the head's own distances) to the loss;
    0 leaves it out. Log σ starts at 0, so the prototype terms are summed with weight 1 here."""
    generator = torch.Generator().manual_seed(0)
    tokens, pooled = torch.randn(12, 5, 16, generator=generator), torch.randn(12, 16, generator=generator)
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    torch.manual_seed(0)
    plain = HeadOptimal(**SMALL).eval()
    with_usage = HeadOptimal(**{**SMALL, "usage_scale": 0.5}).eval()
    with_usage.load_state_dict(plain.state_dict())
    _, loss_plain, terms_plain = plain(tokens, pooled, labels)
    _, loss_usage, terms_usage = with_usage(tokens, pooled, labels)
    assert "usage" not in terms_plain and float(terms_usage["usage"]) > 0
    scores, _ = with_usage.score(tokens, pooled, labels)
    expected = losses.prototype_usage_loss(scores.distances, with_usage.bank.valid, labels)
    assert float(terms_usage["usage"]) == pytest.approx(float(expected.detach()))
    assert float((loss_usage - loss_plain).detach()) == pytest.approx(0.5 * float(expected.detach()), rel=1e-5)
    loss_usage.backward()
    assert with_usage.proj[0].weight.grad is not None and bool(torch.isfinite(with_usage.proj[0].weight.grad).all())
