"""The head: the document's usage example, presets, batch invariance, inert slots, state, bad input."""

from __future__ import annotations

import pytest
import torch

from protohead import PRESET_DESCRIPTIONS, PRESETS, Head, HeadOptimal, losses

SMALL = dict(num_classes=5, emb_dim=32, num_heads=4, img_feat_dim=24, num_prototypes=2, max_prototypes=4)


def batch(b=6, n=9, f=24, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, f, generator=g), torch.randn(b, f, generator=g),
            torch.randint(0, c, (b,), generator=g))


def test_document_usage_example_runs_verbatim():
    torch.manual_seed(0)
    pool_features, img_features = torch.randn(4, 196, 384), torch.randn(4, 384)
    labels = torch.tensor([0, 3, 5, 6])
    model = HeadOptimal(
        num_classes=7,
        emb_dim=384,
        num_heads=8,
        img_feat_dim=384,
        num_prototypes=5,
        max_prototypes=10,
        use_class_balanced=True,
        cb_beta=0.9999,
        use_abstention=True,
        abstention_scale=0.1,
    )
    logits, loss, loss_dict = model(pool_features, img_features, labels)
    assert logits.shape == (4, 7) and loss.dim() == 0 and torch.isfinite(loss)
    assert {"ce", "cluster", "separation", "abstention", "total"} <= set(loss_dict)
    model.eval()
    logits, _, info = model(pool_features, img_features)
    uncertainty = info["uncertainty"]
    assert uncertainty.shape == (4,) and ((uncertainty >= 0) & (uncertainty <= 1)).all()
    assert info["similarities"].shape == (4, 7, 10)
    assert torch.isinf(info["similarities"][:, :, 5:]).all()  # unused slots masked
    assert info["evidence"].shape == (4, 7, 10, 196)
    simple_head = Head(num_classes=7, emb_dim=384, num_heads=8, img_feat_dim=384)
    logits, loss = simple_head(pool_features, img_features, labels)
    assert logits.shape == (4, 7) and torch.isfinite(loss)


def test_every_preset_is_documented():
    assert set(PRESETS) >= {"basic", "long_tail", "uncertainty", "protopnet", "protoasnet", "head_v1",
                            "optimalhead", "head_fixed", "optimal"}
    assert all(PRESET_DESCRIPTIONS[name] for name in PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains_with_finite_gradients(preset):
    torch.manual_seed(0)
    head = HeadOptimal(preset=preset, **SMALL, class_counts=(50, 20, 10, 5, 2))
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3)
    pool, img, labels = batch()
    losses_seen = []
    for _ in range(3):
        logits, loss, _ = head(pool, img, labels)
        optimiser.zero_grad()
        loss.backward()
        for name, param in head.named_parameters():
            if param.grad is not None:
                assert torch.isfinite(param.grad).all(), name
        optimiser.step()
        losses_seen.append(float(loss.detach()))
        assert torch.isfinite(logits).all()
    assert all(map(lambda v: v == v, losses_seen))
    assert head.bank.prototypes.grad is not None and head.bank.prototypes.grad.abs().sum() > 0


MODES = [("full", "sequential"), ("class", "sequential"), ("full", "parallel"), ("class", "parallel")]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(("scope", "mixing"), MODES)
def test_batch_invariance(preset, scope, mixing):
    torch.manual_seed(1)
    head = HeadOptimal(preset=preset, **SMALL, attention_scope=scope, mixing=mixing).eval()
    pool, img, _ = batch(b=33, seed=3)
    with torch.no_grad():
        together, _, info_together = head(pool, img)
        alone, _, info_alone = head(pool[:1], img[:1])
        reordered, _, _ = head(pool.flip(0), img.flip(0))
    torch.testing.assert_close(alone[0], together[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-5, rtol=0)
    torch.testing.assert_close(info_alone["uncertainty"][0], info_together["uncertainty"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("scope", "mixing"), [("class", "sequential"), ("full", "parallel"), ("class", "parallel")])
def test_checkpointed_chunks_match_unchunked(scope, mixing):
    torch.manual_seed(2)
    head = HeadOptimal(**SMALL, attention_scope=scope, mixing=mixing, dropout=0.0)
    chunked = HeadOptimal(**SMALL, attention_scope=scope, mixing=mixing, dropout=0.0, checkpoint_chunk_slots=8)
    chunked.load_state_dict(head.state_dict())
    pool, img, labels = batch()
    _, loss_a, _ = head(pool, img, labels)
    _, loss_b, _ = chunked(pool, img, labels)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.bank.prototypes.grad, chunked.bank.prototypes.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["basic", "optimal", "protopnet"])
@pytest.mark.parametrize(("scope", "mixing"), MODES)
def test_unused_slots_are_inert(preset, scope, mixing):
    torch.manual_seed(3)
    head = HeadOptimal(preset=preset, **SMALL, attention_scope=scope, mixing=mixing, dropout=0.0)
    pool, img, labels = batch()
    valid = head.bank.valid.clone()
    assert not valid.all()
    logits, loss, _ = head(pool, img, labels)
    loss.backward()
    grad = head.bank.prototypes.grad
    assert torch.count_nonzero(grad[~valid]) == 0  # exactly zero
    assert grad[valid].abs().sum() > 0
    with torch.no_grad():
        head.bank.prototypes[~valid] = torch.randn_like(head.bank.prototypes[~valid]) * 100
    logits2, loss2, _ = head(pool, img, labels)
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2)


def test_save_load_after_expansion_reproduces_outputs(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(4)
    head = HeadOptimal(**SMALL, use_abstention=True)
    head.set_class_counts([10, 9, 8, 7, 1])
    slot = head.bank.expand(3, torch.randn(32))
    head.bank.expand(3, torch.randn(32))
    head.bank.ema_update(0, 1, torch.randn(32), momentum=0.9)
    assert slot == 2 and int(head.bank.counts[3]) == 4
    head.eval()
    pool, img, _ = batch()
    with torch.no_grad():
        before, _, info = head(pool, img)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    fresh = HeadOptimal(**SMALL, use_abstention=True).eval()
    fresh.load_state_dict(load_file(tmp_path / "head.safetensors"))
    assert torch.equal(fresh.bank.counts, head.bank.counts) and torch.equal(fresh.class_counts, head.class_counts)
    with torch.no_grad():
        after, _, info_after = fresh(pool, img)
    assert torch.equal(before, after)
    assert torch.equal(info["uncertainty"], info_after["uncertainty"])


def test_ema_update_is_standard_and_normalised():
    head = HeadOptimal(**SMALL)
    p = head.bank.prototypes[1, 0].detach().clone()
    v = torch.randn(32)
    head.bank.ema_update(1, 0, v, momentum=0.9)
    want = torch.nn.functional.normalize(0.9 * p + 0.1 * torch.nn.functional.normalize(v, dim=0), dim=0)
    torch.testing.assert_close(head.bank.prototypes[1, 0].detach(), want)
    with pytest.raises(ValueError, match="not a valid prototype"):
        head.bank.ema_update(1, 3, v, momentum=0.9)


def test_expand_refuses_full_class_and_bad_vector():
    head = HeadOptimal(**SMALL)
    head.bank.expand(0, torch.randn(32))
    head.bank.expand(0, torch.randn(32))
    with pytest.raises(ValueError, match="max_prototypes"):
        head.bank.expand(0, torch.randn(32))
    with pytest.raises(ValueError, match="NaN"):
        head.bank.expand(1, torch.full((32,), float("nan")))


def test_class_weights_come_from_dataset_counts():
    head = HeadOptimal(**SMALL, use_class_balanced=True, cb_beta=0.999)
    assert torch.allclose(head.class_weights(), torch.ones(5))  # unknown counts: uniform
    head.set_class_counts([1000, 100, 10, 10, 1])
    weights = head.class_weights()
    assert weights[4] > weights[2] > weights[0]
    # the loss does not depend on which classes happen to be in the batch for the weights
    other = HeadOptimal(**SMALL, use_class_balanced=True, cb_beta=0.5, class_counts=(1000, 100, 10, 10, 1))
    assert not torch.allclose(other.class_weights(), weights)  # β is not a no-op


BAD_INPUTS = [
    ("rank", lambda p, i, y: (p[0], i, y), "shape \\(B, N, F\\)"),
    ("feature size", lambda p, i, y: (p[..., :-1], i, y), "feature size"),
    ("pooled feature size", lambda p, i, y: (p, i[:, :-1], y), "img_features feature size"),
    ("batch mismatch", lambda p, i, y: (p, i[:-1], y), "batch sizes differ"),
    ("nan tokens", lambda p, i, y: (p.clone().index_fill_(0, torch.tensor([1]), float("nan")), i, y), "NaN or Inf"),
    ("inf pooled", lambda p, i, y: (p, i.clone().fill_(float("inf")), y), "img_features contains NaN"),
    ("labels high", lambda p, i, y: (p, i, y.clone().fill_(5)), "labels out of range"),
    ("labels negative", lambda p, i, y: (p, i, y.clone().fill_(-1)), "labels out of range"),
    ("labels float", lambda p, i, y: (p, i, y.float()), "integer tensor"),
    ("labels shape", lambda p, i, y: (p, i, y[:-1]), "labels must have shape"),
    ("empty", lambda p, i, y: (p[:0], i[:0], y[:0]), "empty batch"),
]


@pytest.mark.parametrize(("name", "mutate", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_value_error(name, mutate, message):
    head = HeadOptimal(**SMALL)
    with pytest.raises(ValueError, match=message):
        head(*mutate(*batch()))


@pytest.mark.parametrize("cls", [HeadOptimal, Head])
def test_training_without_labels_is_an_error(cls):
    head = cls(**SMALL).train()
    pool, img, _ = batch()
    with pytest.raises(ValueError, match="labels are required in training mode"):
        head(pool, img)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="num_prototypes"):
        HeadOptimal(num_prototypes=11, max_prototypes=10)
    with pytest.raises(ValueError, match="unknown head option"):
        HeadOptimal(num_clases=7)
    with pytest.raises(ValueError, match="unknown preset"):
        HeadOptimal(preset="nope")
    with pytest.raises(ValueError, match="distance"):
        HeadOptimal(distance="manhattan")
    with pytest.raises(ValueError, match=r"abstention_payoff must be in \[1, num_classes=7\]"):
        HeadOptimal(use_abstention=True, abstention_payoff=7.5)


@pytest.mark.parametrize("mode", ["detached", "coupled"])
def test_the_objective_pays_abstention_at_the_configured_odds(mode):
    """abstention_payoff reaches the loss in both modes: Deep Gamblers' −log((1−α)p_y + α/o) on the detached class
    logits (detached) or on the logits the classifier trains with (coupled, as in the paper)."""
    pool, img, labels = batch()
    torch.manual_seed(0)
    head = HeadOptimal(**SMALL, use_abstention=True, abstention_mode=mode, abstention_scale=0.0,
                       abstention_payoff=2.2).eval()
    scores, _ = head.score(pool, img, labels)
    _, terms = head.objective(scores, labels)
    logits = scores.logits.detach() if mode == "detached" else scores.logits
    want, _ = losses.abstention_loss(logits, scores.abstain_logit, labels, 0.0, payoff=2.2)
    torch.testing.assert_close(terms["abstention"], want)
    paid_in_full, _ = losses.abstention_loss(logits, scores.abstain_logit, labels, 0.0, payoff=1.0)
    assert float(terms["abstention"]) > float(paid_in_full)  # the same α pays back less at odds 1/2.2
    with pytest.raises(ValueError, match="rewards abstaining on every sample"):
        HeadOptimal(**SMALL, use_abstention=True, abstention_scale=0.0)


def test_pooled_vector_with_singleton_axis_is_accepted():
    head = HeadOptimal(**SMALL).eval()
    pool, img, _ = batch()
    with torch.no_grad():
        a, _, _ = head(pool, img)
        b, _, _ = head(pool, img[:, None, :])
    assert torch.equal(a, b)


@pytest.mark.parametrize("distance", ["cosine", "l2", "log_activation"])
def test_shared_and_per_sample_similarity_agree(distance):
    from protohead.similarity import prototype_similarity

    g = torch.Generator().manual_seed(5)
    emb, protos = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(3, 2, 8, generator=g,
                                                                                  dtype=torch.float64)
    shared = prototype_similarity(emb, protos, distance)
    per_sample = prototype_similarity(emb, protos.expand(4, 3, 2, 8), distance)
    for a, b in zip(shared, per_sample, strict=True):
        torch.testing.assert_close(a, b)
    # cosine is the cosine; L2 is the dimension-scaled squared distance
    d = ((emb[1] - protos[2, 1]) ** 2).sum() / 8
    if distance == "cosine":
        want = torch.nn.functional.cosine_similarity(emb[1], protos[2, 1], dim=0)
        torch.testing.assert_close(shared[0][1, 2, 1], want)
    else:
        torch.testing.assert_close(shared[1][1, 2, 1], d)


def test_gated_cosine_equals_cosine_of_materialised_fused_prototypes():
    """The fused parallel-mixing path = cos(e, forward(...)) in value and in gradient (float64)."""
    from protohead.attention import MixedAttentionBlock
    from protohead.similarity import prototype_similarity

    torch.manual_seed(3)
    block = MixedAttentionBlock(dim=16, heads=4, dropout=0.0, ffn_ratio=2).double().eval()
    with torch.no_grad():  # a gate that really mixes (default init is near uniform)
        block.gate.weight.normal_(0, 1.0)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, 2:] = False

    def both(prototypes, tokens, embedding):
        context = block.bank_context(prototypes, valid, "full")
        fused, _ = block(prototypes, valid, tokens, "full", context=context)
        reference = prototype_similarity(embedding, fused, "cosine")[0]
        fast, _ = block.gated_cosine(prototypes, tokens, embedding, context)
        return reference, fast

    inputs = [torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True),
              torch.randn(5, 7, 16, dtype=torch.float64, requires_grad=True),
              torch.randn(5, 16, dtype=torch.float64, requires_grad=True)]
    reference, fast = both(*inputs)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(reference)
    grads_reference = torch.autograd.grad((reference * weights).sum(), [*inputs, *block.parameters()],
                                          allow_unused=True, retain_graph=True)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [*inputs, *block.parameters()], allow_unused=True)
    for a, b in zip(grads_fast, grads_reference, strict=True):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
