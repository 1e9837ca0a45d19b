"""The fast head step (issue 11, item 4): the fused, cache-blocked per-sample attention
(``protohead.attention._CrossProducts``) equals the straightforward computation in value and gradient, keeps
batch invariance, and the cheaper dropout keeps dropout's distribution. No timing asserts: speed is measured
by ``benchmarks/bench_head_step.py``."""

from __future__ import annotations

import pytest
import torch
from test_head import batch as _batch

import protohead.attention as attention
import protohead.head as head_module
from protohead import HeadOptimal
from protohead.attention import MixedAttentionBlock, dropout
from protohead.similarity import prototype_similarity

SMALL = dict(num_classes=5, emb_dim=32, num_heads=4, img_feat_dim=24, num_prototypes=3, max_prototypes=4)


def _block(dtype: torch.dtype = torch.float64) -> MixedAttentionBlock:
    torch.manual_seed(0)
    block = MixedAttentionBlock(dim=16, heads=4, dropout=0.0, ffn_ratio=2).to(dtype).eval()
    with torch.no_grad():  # a gate that really mixes, and a LayerNorm that is not the identity map
        block.gate.weight.normal_(0, 1.0)
        block.norm_cross.weight.normal_(1.0, 0.3)
        block.norm_cross.bias.normal_(0.0, 0.3)
    return block


def _inputs(dtype: torch.dtype = torch.float64, batch: int = 5, classes: int = 3, slots: int = 4
            ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(classes, slots, 16, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(batch, 7, 16, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(batch, 16, generator=g, dtype=dtype).requires_grad_()]


def _small_blocks(monkeypatch: pytest.MonkeyPatch, prototypes_per_block: int, batch: int, heads: int = 4,
                  tokens: int = 7) -> None:
    """Make ``_CrossProducts`` work in blocks of ``prototypes_per_block`` prototypes (the minimum is 8)."""
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", prototypes_per_block * batch * heads * tokens)


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("kept_slots", [None, 8, 0])  # keep every block's activations, the first block's, none
def test_fused_products_equal_reference_in_value_and_gradient(monkeypatch, blocked, kept_slots):
    """``gated_cosine`` fast (fused, blocked, activations kept or recomputed) vs fast=False (plain autograd over
    (B, P, D) tensors), float64: similarities, attention weights and the gradients of every input and parameter."""
    if blocked:
        _small_blocks(monkeypatch, 8, batch=5)  # P = 3·6 = 18 → blocks of 8, 8, 2
    block = _block()
    prototypes, tokens, embedding = _inputs(slots=6)
    valid = torch.ones(3, 6, dtype=torch.bool)
    context = block.bank_context(prototypes, valid, "full")
    fast, fast_weights = block.gated_cosine(prototypes, tokens, embedding, context, return_weights=True,
                                            fast=True, kept_slots=kept_slots)
    reference, reference_weights = block.gated_cosine(prototypes, tokens, embedding, context, return_weights=True,
                                                      fast=False)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_weights, reference_weights, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(reference)
    wrt = [prototypes, tokens, embedding, *block.parameters()]
    grads_fast = torch.autograd.grad((fast * weights).sum(), wrt, allow_unused=True, retain_graph=True)
    grads_reference = torch.autograd.grad((reference * weights).sum(), wrt, allow_unused=True)
    names = ["prototypes", "tokens", "embedding", *(name for name, _ in block.named_parameters())]
    for name, a, b in zip(names, grads_fast, grads_reference, strict=True):
        if b is None:
            assert a is None or not a.abs().any(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_products_equal_materialised_fused_prototypes_float32(monkeypatch):
    """float32, several blocks: the fused path = cos(e, forward(...)) with the fused prototypes materialised."""
    _small_blocks(monkeypatch, 8, batch=6)
    block = _block(torch.float32)
    prototypes, tokens, embedding = _inputs(torch.float32, batch=6, classes=5, slots=4)
    valid = torch.ones(5, 4, dtype=torch.bool)
    context = block.bank_context(prototypes, valid, "full")
    fused, _ = block(prototypes, valid, tokens, "full", context=context)
    reference = prototype_similarity(embedding, fused, "cosine")[0]
    fast, _ = block.gated_cosine(prototypes, tokens, embedding, context)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    grads_fast = torch.autograd.grad(fast.sum(), [prototypes, tokens, embedding], retain_graph=True)
    grads_reference = torch.autograd.grad(reference.sum(), [prototypes, tokens, embedding])
    for a, b in zip(grads_fast, grads_reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the head through the straightforward path (what a traced graph records): class chunks with
    activation checkpointing, the plain autograd products."""
    monkeypatch.setattr(head_module, "fused_path_available", lambda *tensors: False)
    monkeypatch.setattr(attention, "fused_path_available", lambda *tensors: False)


@pytest.mark.parametrize("chunk_slots", [2048, 8])  # 8 < 15 valid slots: the later blocks are recomputed
def test_head_step_equals_reference_path(monkeypatch, chunk_slots):
    """The whole training objective and every parameter gradient, fast path vs the reference path (float64,
    dropout off so both see the same function), including the recomputing (checkpointed) regime."""
    torch.manual_seed(2)
    options = dict(SMALL, dropout=0.0, checkpoint_chunk_slots=chunk_slots)
    fast_head = HeadOptimal(**options).double()
    reference_head = HeadOptimal(**options).double()
    reference_head.load_state_dict(fast_head.state_dict())
    pool, img, labels = (t.double() if t.is_floating_point() else t for t in _batch())
    calls = []
    fused = attention._CrossProducts.apply
    monkeypatch.setattr(attention._CrossProducts, "apply", lambda *args: calls.append(args[-2]) or fused(*args))
    logits_fast, loss_fast, _ = fast_head(pool, img, labels)
    loss_fast.backward()
    assert calls == [chunk_slots]  # one fused call for the (valid) bank, keeping at most chunk_slots slots
    with monkeypatch.context() as patch:
        _reference_path(patch)
        logits_reference, loss_reference, _ = reference_head(pool, img, labels)
        loss_reference.backward()
    assert len(calls) == 1
    torch.testing.assert_close(logits_fast, logits_reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_fast, loss_reference, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(fast_head.named_parameters(), reference_head.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.abs().any(), name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_head_inference_outputs_equal_reference_path(monkeypatch):
    """Eval mode without labels: logits, similarities and the attention evidence, fast vs reference (float32)."""
    torch.manual_seed(3)
    head = HeadOptimal(**SMALL).eval()
    pool, img, _ = _batch(b=7)
    with torch.no_grad():
        logits_fast, _, info_fast = head(pool, img)
        with monkeypatch.context() as patch:
            _reference_path(patch)
            logits_reference, _, info_reference = head(pool, img)
    torch.testing.assert_close(logits_fast, logits_reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info_fast["similarities"], info_reference["similarities"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info_fast["evidence"], info_reference["evidence"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kept_slots", [None, 0])
def test_fused_path_is_batch_invariant_in_value_and_gradient(monkeypatch, kept_slots):
    """A sample's similarities do not depend on its batchmates (alone, in a batch, reordered), and no sample's
    output has a gradient with respect to another sample's tokens or embedding (exactly zero)."""
    _small_blocks(monkeypatch, 8, batch=9)
    block = _block()
    prototypes, tokens, embedding = _inputs(batch=9, classes=4, slots=5)
    valid = torch.ones(4, 5, dtype=torch.bool)
    context = block.bank_context(prototypes, valid, "full")
    together, _ = block.gated_cosine(prototypes, tokens, embedding, context, kept_slots=kept_slots)
    alone, _ = block.gated_cosine(prototypes, tokens[2:3], embedding[2:3], context, kept_slots=kept_slots)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    shuffled, _ = block.gated_cosine(prototypes, tokens[order], embedding[order], context, kept_slots=kept_slots)
    torch.testing.assert_close(alone[0], together[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shuffled, together[order], rtol=1e-12, atol=1e-12)
    grad_tokens, grad_embedding = torch.autograd.grad(together[2].sum(), [tokens, embedding])
    others = torch.arange(9) != 2
    assert torch.count_nonzero(grad_tokens[others]) == 0 and torch.count_nonzero(grad_embedding[others]) == 0
    assert grad_tokens[2].abs().sum() > 0 and grad_embedding[2].abs().sum() > 0


def test_unused_slots_stay_inert_on_the_fused_path(monkeypatch):
    """Blocked and recomputing: unused slots get exactly zero gradient and do not change any output."""
    _small_blocks(monkeypatch, 8, batch=6, tokens=9)
    torch.manual_seed(6)
    head = HeadOptimal(**SMALL, dropout=0.0, checkpoint_chunk_slots=8)
    pool, img, labels = _batch()
    valid = head.bank.valid.clone()
    assert not valid.all()
    logits, loss, _ = head(pool, img, labels)
    loss.backward()
    assert torch.count_nonzero(head.bank.prototypes.grad[~valid]) == 0
    with torch.no_grad():
        head.bank.prototypes[~valid] = torch.randn_like(head.bank.prototypes[~valid]) * 100
    logits2, loss2, _ = head(pool, img, labels)
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2)


def test_dropout_keeps_the_distribution_and_the_seed():
    torch.manual_seed(7)
    x = torch.ones(400, 1000, dtype=torch.float64, requires_grad=True)
    out = dropout(x, 0.1)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.9) < 0.003  # 4e5 draws: σ ≈ 0.0005
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.9))  # inverted scaling
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # the gradient is the same mask and scale
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.1), out)  # the default generator fixes the mask
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    odd = dropout(torch.ones(3, 5, 7), 0.5)  # an odd number of elements
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) <= {0.0, 2.0}


def test_dropout_modules_are_dropout_in_eval_and_in_the_state_dict():
    head = HeadOptimal(**SMALL)
    assert isinstance(head.proj[2], torch.nn.Dropout) and head.proj[2].p == head.config.dropout
    reference = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.LayerNorm(32), torch.nn.Dropout(0.1))
    assert set(head.proj.state_dict()) == set(reference.state_dict())
    head.eval()
    features = torch.randn(2, 24)
    torch.testing.assert_close(head.project(features), head.project_exactly(features))


def test_only_valid_slots_are_scored_when_no_evidence_is_returned():
    """Training and evidence-free scoring compute the valid slots only: equal there to the full computation,
    0 similarity (distance 1) on unused slots, which every consumer masks."""
    torch.manual_seed(8)
    head = HeadOptimal(**SMALL).eval()
    pool, img, _ = _batch(b=5)
    valid = head.bank.valid
    assert not valid.all()
    with torch.no_grad():
        tokens, embedding = head.embed(pool, img)
        sim, dist, _ = head.prototype_scores(tokens, embedding)
        full_sim, _, evidence = head.prototype_scores(tokens, embedding, return_weights=True)  # every slot
    assert evidence is not None
    torch.testing.assert_close(sim[:, valid], full_sim[:, valid], rtol=1e-5, atol=1e-6)
    assert torch.equal(sim[:, ~valid], torch.zeros_like(sim[:, ~valid]))
    torch.testing.assert_close(dist, 1.0 - sim)


@pytest.mark.parametrize("distance", ["cosine", "cosine01"])
def test_soft_patch_similarity_without_the_map_is_the_same_score(distance):
    from protohead.similarity import patch_similarity, token_similarity

    g = torch.Generator().manual_seed(9)
    tokens, prototypes = torch.randn(3, 6, 8, generator=g, dtype=torch.float64), torch.randn(
        4, 2, 8, generator=g, dtype=torch.float64)
    sim, dist, token_map = patch_similarity(tokens, prototypes, distance, "soft", sharpness=5.0)
    sim_only, dist_only, none = patch_similarity(tokens, prototypes, distance, "soft", sharpness=5.0,
                                                 return_map=False)
    assert none is None
    torch.testing.assert_close(sim_only, sim, rtol=0, atol=0)
    torch.testing.assert_close(dist_only, dist, rtol=0, atol=0)
    torch.testing.assert_close(token_map, token_similarity(tokens, prototypes, distance)[0])


def test_autocast_runs_the_fused_path_in_float32_and_tracing_the_plain_path(monkeypatch):
    """Under autocast (bf16 training: amp on CUDA, amp_cpu on the CPU) the token keys and values are bfloat16
    products and the fused per-sample work runs in float32 on them: it agrees with the plain path under the same
    autocast (value and gradients, to bfloat16 rounding). While tracing, the plain path runs: it is what a traced
    graph can record."""
    calls = []
    fused = attention._CrossProducts.apply
    monkeypatch.setattr(attention._CrossProducts, "apply", lambda *args: calls.append(args[1].dtype) or fused(*args))
    torch.manual_seed(10)
    head = HeadOptimal(**SMALL)
    pool, img, labels = _batch()
    results = []
    for fast in (True, False):
        monkeypatch.setattr(attention, "fused_path_available", lambda *tensors, fast=fast: fast)
        head.zero_grad()
        torch.manual_seed(11)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss, _ = head(pool, img, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}))
    assert calls and set(calls) == {torch.float32}  # the fused path ran, on float32 inputs
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results
    assert torch.isfinite(fast_loss) and fast_grads.keys() == plain_grads.keys()
    torch.testing.assert_close(fast_loss, plain_loss, rtol=2e-2, atol=2e-2)
    for name, grad in fast_grads.items():
        assert torch.isfinite(grad).all(), name
        scale = plain_grads[name].abs().max().clamp_min(1e-6)
        assert ((grad - plain_grads[name]).abs().max() / scale) < 0.1, name
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(attention._CrossProducts, "apply", lambda *args: calls.append(1) or fused(*args))
    head.eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
            return self.head(tokens, pooled)[0]

    with torch.no_grad(), pytest.warns():  # the tracer warns about the input checks' Python branches
        traced = torch.jit.trace(Logits(), (pool, img), check_trace=False)
    assert not calls
    torch.testing.assert_close(traced(pool, img), head(pool, img)[0], rtol=1e-5, atol=1e-5)
    head(pool, img)
    assert calls  # eagerly, the fused path
