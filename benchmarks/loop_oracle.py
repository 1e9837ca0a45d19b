"""A plain loop implementation of one training step of the head, for benchmarking only.

It computes the same objective as :class:`protohead.HeadOptimal` the straightforward way: one sample at a
time through the head (batch invariance by construction) and the prototype losses with Python loops over
classes (the separation term loops over class pairs, as the reference code does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protohead import HeadOptimal


def oracle_objective(head: HeadOptimal, pool: torch.Tensor, img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    cfg = head.config
    logits_rows, dist_rows = [], []
    for i in range(pool.shape[0]):
        tokens, embedding = head.embed(pool[i : i + 1], img[i : i + 1])
        sim, dist, _ = head.prototype_scores(tokens, embedding)
        counts = head.bank.counts.tolist()
        logits_rows.append(torch.stack([head.temperature * sim[0, c, : counts[c]].max() for c in range(len(counts))]))
        dist_rows.append(dist[0])
    logits = torch.stack(logits_rows)
    counts = head.bank.counts.tolist()
    weights = head.class_weights()
    ce = F.cross_entropy(logits, labels)
    # cluster: per class present
    num, den = logits.new_zeros(()), logits.new_zeros(())
    for c in range(cfg.num_classes):
        rows = (labels == c).nonzero().flatten().tolist()
        if rows:
            mins = torch.stack([dist_rows[i][c, : counts[c]].min() for i in rows])
            num = num + weights[c] * mins.mean()
            den = den + weights[c]
    cluster = num / den
    # separation: loop over class pairs per sample class
    sep_terms = []
    for c in range(cfg.num_classes):
        rows = (labels == c).nonzero().flatten().tolist()
        for i in rows:
            nearest = None
            for other in range(cfg.num_classes):
                if other == c:
                    continue
                d = dist_rows[i][other, : counts[other]].min()
                nearest = d if nearest is None else torch.minimum(nearest, d)
            sep_terms.append(F.relu(cfg.margin - nearest))
    separation = torch.stack(sep_terms).mean()
    # diversity and contrastive: loops over classes and class pairs
    protos = head.bank.prototypes
    div_terms = []
    for c in range(cfg.num_classes):
        p = F.normalize(protos[c, : counts[c]], dim=-1)
        if counts[c] >= 2:
            cos = p @ p.t()
            iu = torch.triu_indices(counts[c], counts[c], 1)
            div_terms.append(F.relu(cos[iu[0], iu[1]] - cfg.div_threshold).mean())
    diversity = torch.stack(div_terms).mean() if div_terms else logits.new_zeros(())
    cont_sum, cont_n = logits.new_zeros(()), 0
    for c in range(cfg.num_classes):
        pc = F.normalize(protos[c, : counts[c]], dim=-1)
        for other in range(cfg.num_classes):
            if other != c:
                po = F.normalize(protos[other, : counts[other]], dim=-1)
                cont_sum = cont_sum + (pc @ po.t()).sum()
                cont_n += counts[c] * counts[other]
    contrastive = cont_sum / max(cont_n, 1)
    proto = cfg.clst_scale * cluster + cfg.sep_scale * separation + cfg.div_scale * diversity \
        + cfg.contrastive_scale * contrastive
    s = head.log_sigma
    return torch.exp(-s[0]) * ce + s[0] + torch.exp(-s[1]) * proto + s[1]
