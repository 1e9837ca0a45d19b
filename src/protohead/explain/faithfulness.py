"""Faithfulness of the explanations: does the evidence map point at what the logit actually uses?

Deletion test (a CaBRNet-style perturbation test): for each image take the predicted class (argmax of the raw
logits) and that class's winning prototype, rank the image's N tokens by the prototype's evidence map
(``info["evidence"]``, highest first), replace the top-k *input* tokens (the backbone features, before the
head) by the image's mean token, leave the pooled vector unchanged, re-run the model and record the drop of
the predicted class's logit. The same with k tokens chosen uniformly at random is the baseline: a faithful
map makes the explained drop larger than the random one.

:func:`deletion_curve` is the measurement on one batch; :func:`faithfulness_report` the JSON-ready summary of
a split, with prototype statistics (dead prototypes on the training split, push similarities, win shares)
next to it. Inputs are models and tensors; outputs numpy arrays or plain dicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from protohead.explain.diagnostics import win_counts
from protohead.model import head_of

MAX_K = 10
COPIES_PER_PASS = 256  # masked copies of the input scored per forward pass


def _no_evidence(model: nn.Module) -> ValueError:
    head = head_of(model)
    kind = getattr(head, "evidence_kind", None)
    return ValueError(f"the deletion test needs a per-token evidence map, but {type(head).__name__} gives none "
                      f"(evidence_kind {kind!r}: a pooled head without attention, or a baseline)")


@torch.no_grad()
def deletion_curve(model: nn.Module, tokens: torch.Tensor, pooled: torch.Tensor, max_k: int = MAX_K,
                   generator: torch.Generator | None = None, copies_per_pass: int = COPIES_PER_PASS
                   ) -> dict[str, Any]:
    """Logit drops when the most-evidenced (and random) tokens of each image are replaced by its mean token.

    Args:
        model: an eval-mode model whose ``forward(tokens, pooled)`` returns ``(logits, None, info)`` with
            ``info["evidence"]`` (B, C, M, N) and ``info["winning_prototype"]`` (B, C) (a prototype head, or
            an :class:`~protohead.model.EndToEnd` around one).
        tokens: (B, N, F) input feature tokens (the backbone's, before the head).
        pooled: (B, F) pooled features; never changed.
        max_k: the largest number of deleted tokens (k = 1..max_k, at most N).
        generator: RNG for the random token sets (one random order per image; the k random tokens are its
            first k, so the random sets are nested like the explained ones).
        copies_per_pass: masked copies scored per forward pass.

    Returns:
        ``explained`` (B, max_k) and ``random`` (B, max_k) float64 drops (original − new logit of the
        predicted class; k = column + 1), ``predicted`` (B,), ``winning_prototype`` (B,), ``logit`` (B,) the
        original predicted-class logits, ``maps`` (B, N) the evidence maps ranked by, ``k`` [1..max_k].

    Raises:
        ValueError: the model gives no evidence map, or ``max_k`` is outside [1, N].
    """
    batch, num_tokens, _ = tokens.shape
    if not 1 <= max_k <= num_tokens:
        raise ValueError(f"max_k must be in [1, N={num_tokens}], got {max_k}")
    logits, _, info = model(tokens, pooled)
    evidence = info.get("evidence") if isinstance(info, dict) else None
    if evidence is None:
        raise _no_evidence(model)
    rows = torch.arange(batch)
    predicted = logits.argmax(dim=1)
    winner = info["winning_prototype"][rows, predicted]
    maps = evidence[rows, predicted, winner].float()  # (B, N)
    original = logits[rows, predicted]
    explained_order = maps.argsort(dim=1, descending=True, stable=True)
    random_order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    mean_token = tokens.mean(dim=1, keepdim=True)  # (B, 1, F)
    ks = torch.arange(1, max_k + 1)
    drops = {}
    for name, order in (("explained", explained_order), ("random", random_order)):
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(num_tokens).expand(batch, -1))  # rank[b, n]: position of token n
        deleted = (rank[:, None, :] < ks[None, :, None]).reshape(batch * max_k, num_tokens)  # (B·K, N)
        image = torch.arange(batch).repeat_interleave(max_k)  # (B·K,) which image each copy is of
        new = torch.empty(batch * max_k, dtype=logits.dtype)
        for start in range(0, batch * max_k, copies_per_pass):
            part = slice(start, start + copies_per_pass)
            of = image[part]
            masked = torch.where(deleted[part, :, None], mean_token[of], tokens[of])
            out, _, _ = model(masked, pooled[of])
            new[part] = out[torch.arange(len(of)), predicted[of]]
        drops[name] = (original[image] - new).reshape(batch, max_k).double().numpy()
    return {"explained": drops["explained"], "random": drops["random"], "predicted": predicted.numpy(),
            "winning_prototype": winner.numpy(), "logit": original.double().numpy(), "maps": maps.numpy(),
            "k": ks.tolist()}


def json_safe(value: Any) -> Any:
    """``value`` with NaN / ±inf floats replaced by None and numpy scalars / arrays made plain (recursively)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _median(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if finite.numel() else None  # torch's median: the lower middle value


@torch.no_grad()
def _winners(model: nn.Module, split: Any, batch_size: int) -> np.ndarray:
    parts = []
    for start in range(0, split.size, batch_size):
        tokens, pooled, _ = split.fetch(torch.arange(start, min(split.size, start + batch_size)), False)
        parts.append(model(tokens, pooled)[2]["winning_prototype"].numpy())
    return np.concatenate(parts)


def prototype_statistics(head: nn.Module, train_winners: np.ndarray, train_labels: np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Dead-prototype share, push similarities and win concentration of a prototype head.

    Args:
        head: a :class:`~protohead.head.HeadOptimal`.
        train_winners: (n, C) winning slot of every class for each training image.
        train_labels: (n,) their labels.

    Returns:
        ``dead_prototype_share`` (valid prototypes that win no training image of their own class / valid
        prototypes), ``median_push_similarity``, ``median_prepush_similarity`` (over valid slots, NaN ignored;
        None if none), ``never_pushed`` (valid slots with no push record), ``top_prototype_win_share``
        (class name → share of the class's training images won by its most-winning prototype; None for a class
        without training images) and ``effective_prototypes`` (class name → exp of the entropy of how its training
        images are shared among its prototypes as winners: 1 = one prototype explains the whole class, K = all K
        valid prototypes equally often; None without images).
    """
    valid = head.bank.valid.cpu()
    labels = np.asarray(train_labels)
    _, own = win_counts(train_winners, valid, labels)
    valid_np = valid.numpy()
    total = int(valid_np.sum())
    dead = int(((own == 0) & valid_np).sum())
    shares: dict[str, float | None] = {}
    effective: dict[str, float | None] = {}
    for c in range(valid_np.shape[0]):
        name = str(class_names[c]) if class_names is not None else str(c)
        images = int((labels == c).sum())
        shares[name] = float(own[c][valid_np[c]].max() / images) if images and valid_np[c].any() else None
        fractions = own[c][own[c] > 0] / images if images else np.zeros(0)
        effective[name] = float(np.exp(-(fractions * np.log(fractions)).sum())) if fractions.size else None
    return {"dead_prototype_share": dead / total if total else None,
            "median_push_similarity": _median(head.push_similarity.detach().cpu()[valid].float()),
            "median_prepush_similarity": _median(head.bank.prepush_similarity.detach().cpu()[valid].float()),
            "never_pushed": int((head.push_image.cpu()[valid] < 0).sum()),
            "top_prototype_win_share": shares, "effective_prototypes": effective}


def faithfulness_report(model: nn.Module, split: Any, indices: Sequence[int] | None, batch_size: int,
                        train_split: Any, class_names: Sequence[str] | None = None, seed: int = 0,
                        max_k: int = MAX_K) -> dict[str, Any]:
    """The faithfulness summary of ``model`` on ``indices`` of ``split`` (JSON-ready: NaN → None).

    Args:
        model: eval-mode prototype model (head or :class:`~protohead.model.EndToEnd`).
        split: the evaluated split's inputs (``fetch(indices, train) -> (tokens, pooled, labels)``, ``size``).
        indices: images of ``split`` to test (None: all).
        batch_size: images per batch (each makes 2 · max_k masked copies).
        train_split: the training split's inputs (``fetch``, ``size``, ``labels``), for the win statistics.
        class_names: names for ``top_prototype_win_share``.
        seed: seeds the random token sets.
        max_k: deleted tokens up to (capped at N).

    Returns:
        ``deletion_drop_explained`` / ``deletion_drop_random`` (mean logit drop for k = 1..max_k),
        ``deletion_ratio_at_5`` (explained / random at k = 5; None unless the random drop is positive),
        ``attention_concentration`` (mean normalised entropy H(evidence) / log N of the predicted class's
        winning prototype; attention heads only, else None), ``evidence_kind``, ``images``, ``k``, ``seed``,
        ``replacement``, and the :func:`prototype_statistics`. A head without evidence maps gets None for the
        deletion entries (the statistics are still reported).
    """
    head = head_of(model)
    if not hasattr(head, "bank"):
        raise ValueError(f"{type(head).__name__} has no prototypes: no faithfulness report")
    kind = head.evidence_kind
    indices = list(range(split.size)) if indices is None else list(indices)
    explained: list[np.ndarray] = []
    random: list[np.ndarray] = []
    entropies: list[np.ndarray] = []
    k_used = max_k
    if kind is not None and indices:
        generator = torch.Generator().manual_seed(seed)
        order = torch.as_tensor(indices, dtype=torch.long)
        for start in range(0, len(order), batch_size):
            tokens, pooled, _ = split.fetch(order[start:start + batch_size], False)
            k_used = min(max_k, tokens.shape[1])
            curve = deletion_curve(model, tokens, pooled, k_used, generator)
            explained.append(curve["explained"])
            random.append(curve["random"])
            if kind == "attention":
                p = np.clip(curve["maps"].astype(np.float64), 1e-12, None)
                p = p / p.sum(axis=1, keepdims=True)
                entropies.append(-(p * np.log(p)).sum(axis=1) / math.log(p.shape[1]) if p.shape[1] > 1
                                 else np.ones(p.shape[0]))
    if explained:
        drop_explained = np.concatenate(explained).mean(axis=0)
        drop_random = np.concatenate(random).mean(axis=0)
        ratio = (float(drop_explained[4] / drop_random[4]) if k_used >= 5 and drop_random[4] > 1e-12 else None)
        deletion: dict[str, Any] = {"deletion_drop_explained": drop_explained.tolist(),
                                    "deletion_drop_random": drop_random.tolist(), "deletion_ratio_at_5": ratio}
    else:
        deletion = {"deletion_drop_explained": None, "deletion_drop_random": None, "deletion_ratio_at_5": None}
    concentration = float(np.concatenate(entropies).mean()) if entropies else None
    statistics = prototype_statistics(head, _winners(model, train_split, batch_size), train_split.labels,
                                      class_names)
    return json_safe({**deletion, **statistics, "attention_concentration": concentration, "evidence_kind": kind,
                      "images": len(indices), "k": list(range(1, k_used + 1)), "seed": seed,
                      "replacement": "mean token of the image (input features; pooled vector unchanged)"})
