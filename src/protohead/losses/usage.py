"""Balanced use of each class's prototypes on that class's own images (a multi-prototype head's anti-collapse term).

With logits set by the best-matching prototype of each class, the prototype that wins early takes every gradient of
its class and keeps winning: on HAM10000 one prototype per class wins 78–100 % of that class's training images, so the
other prototypes almost never explain a correct prediction. This term asks the samples of a class in the batch to be
split evenly among its valid prototypes, as in the pixel–prototype assignment of ProtoSeg (Zhou et al., CVPR 2022) and
the swapped assignments of SwAV (Caron et al., NeurIPS 2020): an equipartition target is computed by Sinkhorn–Knopp
iterations on the detached scores, and each sample's softmax over its class's prototypes is trained towards it
(cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def balanced_assignment(scores: torch.Tensor, members: torch.Tensor, slots: torch.Tensor, epsilon: float = 0.05,
                        iterations: int = 3) -> torch.Tensor:
    """Equipartition soft assignment of each class's member samples to its valid slots (Sinkhorn–Knopp).

    Args:
        scores: (C, B, M) similarity of sample b to prototype m of class c (higher = closer).
        members: (C, B) bool, sample b belongs to class c.
        slots: (C, M) bool, valid prototype slots.
        epsilon: entropic regularisation (SwAV's 0.05 for cosine scores).
        iterations: Sinkhorn iterations.

    Returns:
        (C, B, M) targets: each member's row sums to 1, each valid slot receives about n_c / K_c of the class's
        mass; zero outside members × valid slots.
    """
    masked = scores.masked_fill(~(members[:, :, None] & slots[:, None, :]), float("-inf"))
    plan = ((masked - masked.amax(dim=-1, keepdim=True).clamp_min(-1e30)) / epsilon).exp()  # 0 outside the mask
    count = members.sum(1).to(scores.dtype)[:, None, None]  # n_c
    width = slots.sum(1).to(scores.dtype)[:, None, None]  # K_c
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True).clamp_min(1e-30) / width  # each slot holds 1 / K_c
        plan = plan / plan.sum(dim=2, keepdim=True).clamp_min(1e-30) / count  # each sample holds 1 / n_c
    return plan * count


def prototype_usage_loss(distances: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                         sharpness: float = 10.0, epsilon: float = 0.05) -> torch.Tensor:
    """Cross-entropy between each sample's soft assignment to its class's prototypes and an equipartition target.

    A sample's assignment is ``softmax(−sharpness · d)`` over the valid prototypes of its own class; the target
    (:func:`balanced_assignment`, on the detached scores ``−d``) splits the batch's samples of that class evenly
    among those prototypes. Only classes with at least two valid prototypes and at least as many samples in the
    batch as valid prototypes take part (fewer samples cannot be split evenly); the loss is the mean over those
    classes of the mean over their samples, 0 when none qualifies.

    Args:
        distances: (B, C, M) sample-to-prototype distances.
        valid: (C, M) bool valid-slot mask.
        labels: (B,) int64.
        sharpness: inverse temperature of the assignment softmax.
        epsilon: Sinkhorn regularisation of the target.

    Returns:
        scalar.
    """
    num_classes = distances.shape[1]
    members = F.one_hot(labels, num_classes).t().bool()  # (C, B)
    count, width = members.sum(1), valid.sum(1)
    eligible = (width >= 2) & (count >= width)  # (C,)
    if not bool(eligible.any()):
        return distances.sum() * 0.0
    # at least float32: under bfloat16 autocast the distances arrive in bfloat16, too coarse for the Sinkhorn scaling
    scores = -distances.permute(1, 0, 2).to(torch.promote_types(distances.dtype, torch.float32))  # (C, B, M)
    members, slots = members[eligible], valid[eligible]
    scores = scores[eligible]
    target = balanced_assignment(scores.detach(), members, slots, epsilon)
    log_assignment = (sharpness * scores).masked_fill(~slots[:, None, :], float("-inf")).log_softmax(dim=-1)
    per_sample = -(target * log_assignment.masked_fill(~slots[:, None, :], 0.0)).sum(-1)  # (C', B)
    per_class = (per_sample * members).sum(1) / count[eligible]
    return per_class.mean()
