"""Push, expansion, re-seeding and pruning of the prototype bank (SPEC §5). Deterministic; state in the head.

- push: each valid prototype moves by EMA toward its nearest projected training patch token of its own
  class (nearest under the head's own similarity, in the space patch scoring compares); the source
  (image index, token index) and the similarity before and after the move are recorded in the bank.
- expansion: a class whose training samples are poorly covered (their best own-class similarity is below
  their best other-class similarity) gets one new prototype, placed on the real patch nearest to the mean
  projected embedding of those samples (pushed at once), while it has free slots; its AdamW state is reset.
- dead prototypes (winning no training image of their class) are re-seeded on a real patch near one of
  the class's worst-covered images during training (:func:`reseed_dead_prototypes`) and removed at the
  final push (:func:`final_push`), which projects every prototype exactly onto its source patch when the
  head scores patches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from protohead.head import HeadOptimal
from protohead.similarity import masked_max, paired_similarity, prototype_similarity
from protohead.training import distributed

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]
"""A callable yielding (indices (B,), tokens (B, N, F), pooled (B, F), labels (B,)) over the training set."""


@torch.no_grad()
def find_push_targets(head: HeadOptimal, batches: Batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    """Nearest own-class training token of every prototype.

    Returns:
        (similarity (C, M), image index (C, M), token index (C, M), projected token vectors (C, M, D), the
        tokens' backbone features (C, M, F)); entries of classes with no training image keep similarity −inf
        and index −1.
    """
    bank = head.bank
    prototypes = head.prototype_vectors()
    num_classes, max_slots, dim = prototypes.shape
    device = prototypes.device
    best_sim = torch.full((num_classes, max_slots), float("-inf"), device=device)
    best_image = torch.full((num_classes, max_slots), -1, dtype=torch.long, device=device)
    best_token = torch.full((num_classes, max_slots), -1, dtype=torch.long, device=device)
    best_vector = torch.zeros(num_classes, max_slots, dim, device=device)
    best_raw = torch.zeros(num_classes, max_slots, bank.source_features.shape[-1], device=device)
    was_training = head.training
    head.eval()
    for indices, tokens, _, labels in batches():
        projected = head.project(tokens)  # (B, N, D)
        batch, num_tokens, _ = projected.shape
        flat = projected.reshape(batch * num_tokens, dim)
        sim, _ = prototype_similarity(flat, prototypes, head.config.distance)  # (B·N, C, M)
        token_label = labels.repeat_interleave(num_tokens)
        own = F.one_hot(token_label, num_classes).bool()[:, :, None]  # (B·N, C, 1)
        sim = sim.masked_fill(~own, float("-inf"))
        batch_best, where = sim.max(dim=0)  # (C, M): first maximum wins, so ties are deterministic
        better = batch_best > best_sim
        best_sim = torch.where(better, batch_best, best_sim)
        best_image = torch.where(better, indices[where // num_tokens], best_image)
        best_token = torch.where(better, where % num_tokens, best_token)
        best_vector = torch.where(better[..., None], flat[where], best_vector)
        best_raw = torch.where(better[..., None], tokens.reshape(batch * num_tokens, -1)[where].to(best_raw.dtype),
                               best_raw)
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
        raws = distributed.gather_rows_nograd(best_raw[None])
        best_raw = raws.gather(0, pick[..., None].expand(1, *best_raw.shape))[0]
    return best_sim, best_image, best_token, best_vector, best_raw


def projects_exactly(head: HeadOptimal) -> bool:
    """Whether the final push puts prototypes exactly on their source patches: patch scoring compares the
    raw prototypes with the tokens, so a projected prototype scores its source patch exactly; the document's
    pooled scoring compares attention-adapted prototypes with the pooled embedding, where the push stays
    the configured EMA step."""
    return head.config.scoring == "patch"


@torch.no_grad()
def push_prototypes(head: HeadOptimal, batches: Batches, momentum: float | None = None,
                    where: torch.Tensor | None = None, anchor: bool = False) -> int:
    """Move every valid prototype (or those ``where`` (C, M) marks) toward its nearest own-class token by EMA
    (``momentum``, default the config's; 0 projects exactly) and record the sources. ``anchor``: project every
    prototype exactly and anchor the bank (each prototype is from now on its source patch, projected by the
    head's current projection; see :meth:`~protohead.bank.PrototypeBank.anchor`). Returns the count."""
    sim, image, token, vector, raw = find_push_targets(head, batches)
    bank = head.bank
    if anchor:
        if where is not None:
            raise ValueError("anchoring pushes every valid prototype; do not pass where")
        momentum = 0.0
    momentum = head.config.momentum if momentum is None else momentum
    chosen = bank.valid & (image >= 0) & (True if where is None else where)
    for c, k in chosen.nonzero().tolist():
        bank.push(c, k, vector[c, k], momentum, int(image[c, k]), int(token[c, k]), float(sim[c, k]))
    if anchor:
        bank.anchor(raw, head.project_exactly)
    after = paired_similarity(head.prototype_vectors().detach(), vector, head.config.distance)
    bank.record_similarity(after, chosen)
    return int(chosen.sum())


@torch.no_grad()
def coverage(head: HeadOptimal, batches: Batches
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per training sample: (index, label, own-class margin = best own sim − best other sim, embedding (D,),
    winning slot of its own class)."""
    was_training = head.training
    head.eval()
    rows = []
    for indices, tokens, pooled, labels in batches():
        projected, embedding = head.embed(tokens, pooled)
        sim, _, _ = head.prototype_scores(projected, embedding)
        best, winner = masked_max(sim, head.bank.valid)  # (B, C)
        own = best.gather(1, labels[:, None]).squeeze(1)
        other = best.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        rows.append((indices, labels, own - other, embedding, winner.gather(1, labels[:, None]).squeeze(1)))
    head.train(was_training)
    parts = [distributed.gather_rows_nograd(torch.cat(column)) for column in zip(*rows, strict=True)]
    order = torch.argsort(parts[0])  # canonical (dataset) order, whatever the number of ranks
    return tuple(part[order] for part in parts)  # type: ignore[return-value]


def own_class_wins(labels: torch.Tensor, winners: torch.Tensor, num_classes: int, max_slots: int) -> torch.Tensor:
    """(C, M) how many training images of each class each of its prototypes wins (from :func:`coverage`)."""
    wins = torch.zeros(num_classes * max_slots, dtype=torch.long, device=labels.device)
    wins.index_add_(0, labels * max_slots + winners, torch.ones_like(labels))
    return wins.reshape(num_classes, max_slots)


def dead_prototypes(head: HeadOptimal, labels: torch.Tensor, winners: torch.Tensor) -> torch.Tensor:
    """(C, M) bool: valid prototypes that win no training image of their class (classes with images only)."""
    wins = own_class_wins(labels, winners, head.config.num_classes, head.config.max_prototypes)
    has_images = torch.bincount(labels, minlength=head.config.num_classes) > 0
    return head.bank.valid & (wins == 0) & has_images[:, None]


@torch.no_grad()
def place_on_patches(head: HeadOptimal, batches: Batches, slots: list[tuple[int, int]], targets: torch.Tensor,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    """Put each (class, slot) at its target (D,) and push it at once exactly onto the nearest own-class patch."""
    if not slots:
        return
    where = torch.zeros_like(head.bank.valid)
    for (c, k), target in zip(slots, targets, strict=True):
        head.bank.prototypes[c, k] = F.normalize(target, dim=-1) if head.bank.normalized else target
        where[c, k] = True
        if optimizer is not None:
            reset_slot_state(optimizer, head.bank.prototypes, c, k)
    push_prototypes(head, batches, momentum=0.0, where=where)


@torch.no_grad()
def expand_prototypes(head: HeadOptimal, batches: Batches, min_fraction: float,
                      optimizer: torch.optim.Optimizer | None = None) -> list[tuple[int, int]]:
    """Give each poorly covered class one new prototype on a real patch; returns the new (class, slot) pairs."""
    _, labels, margin, embedding, _ = coverage(head, batches)
    added, targets = [], []
    for c in range(head.config.num_classes):
        members = labels == c
        if not members.any() or int(head.bank.counts[c]) >= head.config.max_prototypes:
            continue
        poor = members & (margin < 0)
        if poor.sum() < min_fraction * members.sum() or not poor.any():
            continue
        target = embedding[poor].mean(dim=0)
        added.append((c, head.bank.expand(c, target)))
        targets.append(target)
    if added:
        place_on_patches(head, batches, added, torch.stack(targets), optimizer)
    return added


@torch.no_grad()
def reseed_dead_prototypes(head: HeadOptimal, batches: Batches,
                           optimizer: torch.optim.Optimizer | None = None) -> list[tuple[int, int]]:
    """Move every dead prototype onto a real patch near one of its class's worst-covered training images
    (the i-th dead slot of a class goes to its i-th lowest-margin image); returns the re-seeded slots."""
    _, labels, margin, embedding, winners = coverage(head, batches)
    dead = dead_prototypes(head, labels, winners)
    slots, targets = [], []
    for c in range(head.config.num_classes):
        dead_slots = dead[c].nonzero().flatten().tolist()
        if not dead_slots:
            continue
        members = (labels == c).nonzero().flatten()
        worst = members[torch.argsort(margin[members], stable=True)]
        for i, k in enumerate(dead_slots):
            slots.append((c, k))
            targets.append(embedding[worst[i % len(worst)]])
    if slots:
        place_on_patches(head, batches, slots, torch.stack(targets), optimizer)
    return slots


@torch.no_grad()
def final_push(head: HeadOptimal, batches: Batches) -> dict[str, Any]:
    """The end-of-training push (ProtoPNet's projection): every valid prototype onto its nearest own-class
    patch (exactly with patch scoring, else the configured EMA step), then dead prototypes removed (a class
    keeps at least one). Returns what it did: ``pushed``, ``pruned`` (class, slot before removal),
    ``median_prepush_similarity`` (how close the prototypes were to a real patch before it) and
    ``median_push_similarity`` (their similarity to the source after it)."""
    pushed = push_prototypes(head, batches, anchor=projects_exactly(head))
    bank = head.bank
    pruned = prune_dead_prototypes(head, batches)
    valid = bank.valid
    return {"pushed": pushed, "pruned": pruned,
            "median_prepush_similarity": float(bank.prepush_similarity[valid].nanmedian()),
            "median_push_similarity": float(bank.push_similarity[valid].nanmedian())}


def reset_slot_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, class_index: int, slot: int) -> None:
    """Zero the optimiser's per-element state (e.g. AdamW moments) of one prototype slot."""
    state = optimizer.state.get(parameter, {})
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            value[class_index, slot] = 0


@torch.no_grad()
def prune_dead_prototypes(head: HeadOptimal, batches: Batches) -> list[tuple[int, int]]:
    """Remove the valid prototypes that win no training image of their class (a class keeps at least one);
    returns the removed (class, slot) pairs, slots as they were before removal, highest slot first per class."""
    _, labels, _, _, winners = coverage(head, batches)
    dead = dead_prototypes(head, labels, winners)
    pruned = []
    for c, k in sorted(dead.nonzero().tolist(), key=lambda pair: (pair[0], -pair[1])):
        if int(head.bank.counts[c]) > 1:
            head.bank.remove(c, k)
            pruned.append((c, k))
    return pruned
