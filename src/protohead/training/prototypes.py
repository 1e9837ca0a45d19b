"""Push and data-driven expansion of the prototype bank (SPEC §5). Deterministic; state in the head.

- push: each valid prototype moves by EMA toward its nearest projected training patch token of its own
  class (nearest under the head's own similarity); the source (image index, token index, similarity) is
  recorded in the bank's ``push_*`` buffers.
- expansion: a class whose training samples are poorly covered (their best own-class similarity is below
  their best other-class similarity) gets one new prototype, placed at the mean projected embedding of
  those samples, while it has free slots; AdamW state of the new slot is reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from protohead.head import HeadOptimal
from protohead.similarity import masked_max, prototype_similarity
from protohead.training import distributed

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]
"""A callable yielding (indices (B,), tokens (B, N, F), pooled (B, F), labels (B,)) over the training set."""


@torch.no_grad()
def find_push_targets(head: HeadOptimal, batches: Batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """Nearest own-class training token of every prototype.

    Returns:
        (similarity (C, M), image index (C, M), token index (C, M), token vectors (C, M, D)); entries of
        classes with no training image keep similarity −inf and index −1.
    """
    bank = head.bank
    num_classes, max_slots, dim = bank.prototypes.shape
    best_sim = torch.full((num_classes, max_slots), float("-inf"))
    best_image = torch.full((num_classes, max_slots), -1, dtype=torch.long)
    best_token = torch.full((num_classes, max_slots), -1, dtype=torch.long)
    best_vector = torch.zeros(num_classes, max_slots, dim)
    was_training = head.training
    head.eval()
    for indices, tokens, _, labels in batches():
        projected = head.project(tokens)  # (B, N, D)
        batch, num_tokens, _ = projected.shape
        flat = projected.reshape(batch * num_tokens, dim)
        sim, _ = prototype_similarity(flat, bank.prototypes, head.config.distance)  # (B·N, C, M)
        token_label = labels.repeat_interleave(num_tokens)
        own = F.one_hot(token_label, num_classes).bool()[:, :, None]  # (B·N, C, 1)
        sim = sim.masked_fill(~own, float("-inf"))
        batch_best, where = sim.max(dim=0)  # (C, M): first maximum wins, so ties are deterministic
        better = batch_best > best_sim
        best_sim = torch.where(better, batch_best, best_sim)
        best_image = torch.where(better, indices[where // num_tokens], best_image)
        best_token = torch.where(better, where % num_tokens, best_token)
        best_vector = torch.where(better[..., None], flat[where], best_vector)
    head.train(was_training)
    if distributed.rank_and_world()[1] > 1:  # each rank saw a shard: keep the best over ranks, same on all
        sims = distributed.gather_rows_nograd(best_sim[None])  # (world, C, M)
        images = distributed.gather_rows_nograd(best_image[None])
        # highest similarity wins; ties go to the lowest image index, as in one process
        score = torch.where(images >= 0, sims, torch.full_like(sims, float("-inf")))
        top = score.amax(dim=0, keepdim=True)
        candidates = torch.where(score == top, images, torch.full_like(images, torch.iinfo(torch.long).max))
        winner = candidates.argmin(dim=0)  # (C, M) rank index
        pick = winner[None]
        best_sim = sims.gather(0, pick)[0]
        best_image = images.gather(0, pick)[0]
        best_token = distributed.gather_rows_nograd(best_token[None]).gather(0, pick)[0]
        vectors = distributed.gather_rows_nograd(best_vector[None])
        best_vector = vectors.gather(0, pick[..., None].expand(1, *best_vector.shape))[0]
    return best_sim, best_image, best_token, best_vector


@torch.no_grad()
def push_prototypes(head: HeadOptimal, batches: Batches) -> int:
    """EMA every valid prototype toward its nearest own-class token; record the sources. Returns the count."""
    sim, image, token, vector = find_push_targets(head, batches)
    valid = head.bank.valid
    pushed = 0
    for c, k in valid.nonzero().tolist():
        if image[c, k] < 0:
            continue
        head.bank.push(c, k, vector[c, k], head.config.momentum, int(image[c, k]), int(token[c, k]),
                       float(sim[c, k]))
        pushed += 1
    return pushed


@torch.no_grad()
def coverage(head: HeadOptimal, batches: Batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per training sample: (index, label, own-class margin = best own sim − best other sim, embedding (D,))."""
    was_training = head.training
    head.eval()
    rows = []
    for indices, tokens, pooled, labels in batches():
        projected, embedding = head.embed(tokens, pooled)
        sim, _, _ = head.prototype_scores(projected, embedding)
        best, _ = masked_max(sim, head.bank.valid)  # (B, C)
        own = best.gather(1, labels[:, None]).squeeze(1)
        other = best.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        rows.append((indices, labels, own - other, embedding))
    head.train(was_training)
    parts = [distributed.gather_rows_nograd(torch.cat(column)) for column in zip(*rows, strict=True)]
    order = torch.argsort(parts[0])  # canonical (dataset) order, whatever the number of ranks
    return tuple(part[order] for part in parts)  # type: ignore[return-value]


@torch.no_grad()
def expand_prototypes(head: HeadOptimal, batches: Batches, min_fraction: float,
                      optimizer: torch.optim.Optimizer | None = None) -> list[tuple[int, int]]:
    """Give each poorly covered class one new prototype; returns the new (class, slot) pairs."""
    _, labels, margin, embedding = coverage(head, batches)
    added = []
    for c in range(head.config.num_classes):
        members = labels == c
        if not members.any() or int(head.bank.counts[c]) >= head.config.max_prototypes:
            continue
        poor = members & (margin < 0)
        if poor.sum() < min_fraction * members.sum() or not poor.any():
            continue
        slot = head.bank.expand(c, embedding[poor].mean(dim=0))
        added.append((c, slot))
        if optimizer is not None:
            reset_slot_state(optimizer, head.bank.prototypes, c, slot)
    return added


def reset_slot_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, class_index: int, slot: int) -> None:
    """Zero the optimiser's per-element state (e.g. AdamW moments) of one prototype slot."""
    state = optimizer.state.get(parameter, {})
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            value[class_index, slot] = 0
