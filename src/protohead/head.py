"""HeadOptimal / Head: projection → prototype bank → per-sample mixed attention → similarity → logits.

Composition only: the math lives in :mod:`protohead.similarity`, :mod:`protohead.losses` and
:mod:`protohead.attention`; prototype state in :mod:`protohead.bank`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from protohead import losses
from protohead.attention import Dropout, MixedAttentionBlock, fused_path_available
from protohead.bank import PrototypeBank
from protohead.config import HeadConfig, preset_config
from protohead.density import FeatureDensity, ood_outputs
from protohead.objective import HeadScores, PrototypeObjective, scalar_terms
from protohead.similarity import masked_max, patch_similarity, prototype_similarity
from protohead.validation import check_head_inputs

ABSTENTION_HIDDEN = 64  # width of the detached abstention head's hidden layer


class HeadOptimal(nn.Module):
    """Multi-prototype classification head (the design document's recommended head).

    Construct with keyword options (any :class:`HeadConfig` field), a ``config``, or a ``preset`` name::

        HeadOptimal(num_classes=7, emb_dim=384, num_heads=8, img_feat_dim=384)
        HeadOptimal(preset="long_tail", num_classes=7, img_feat_dim=1280, class_counts=(228, 359, ...))

    ``forward(pool_features (B, N, F), img_features (B, F) | (B, 1, F), labels (B,) | None)`` returns
    ``(logits (B, C), loss | None, info)``:

    - with labels: ``loss`` is the scalar training objective (``self.objective``, a
      :class:`~protohead.objective.PrototypeObjective` built from the config) and ``info`` holds every loss
      component as a detached scalar (so ``{k: v.item() for k, v in info.items()}`` works); per-sample
      outputs come from :meth:`score`;
    - without labels (inference, eval mode only): ``loss`` is ``None`` and ``info`` holds ``uncertainty``
      (B,), ``probabilities`` (B, C), ``similarities`` (B, C, M) with unused slots at −inf,
      ``evidence`` (B, C, M, N) the per-token evidence map of each prototype (:attr:`evidence_kind`),
      ``winning_prototype`` (B, C), ``ood_score`` (B,), higher = further from what the run has seen: the
      squared Mahalanobis distance of the pooled features to the nearest class mean (``feature_distance``,
      :mod:`protohead.density`) once :attr:`feature_density` is fitted (runs fit it after training), else the
      energy −logsumexp of the logits (each logit is T × the best prototype similarity of its class).
    Without labels in training mode it raises ``ValueError`` (it never returns a silent zero loss).
    """

    def __init__(self, config: HeadConfig | None = None, *, preset: str | None = None, **options: Any) -> None:
        super().__init__()
        if config is not None and preset is not None:
            raise ValueError("pass either config or preset, not both")
        if preset is not None:
            config = preset_config(preset, **options)
        elif config is None:
            config = HeadConfig().replace(**options)
        elif options:
            config = config.replace(**options)
        self.config = config
        dim = config.emb_dim
        self.proj = nn.Sequential(nn.Linear(config.img_feat_dim, dim), nn.LayerNorm(dim), Dropout(config.dropout))
        self.bank = PrototypeBank(config.num_classes, config.max_prototypes, dim, config.num_prototypes,
                                  normalized=config.distance in ("cosine", "cosine01"),
                                  source_dim=config.img_feat_dim)
        self.attention = (MixedAttentionBlock(dim, config.num_heads, config.dropout, config.ffn_ratio, config.fusion)
                          if config.use_attention else None)
        log_temperature = torch.tensor(math.log(config.temperature))
        if config.learnable_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        if config.use_abstention and config.abstention_mode == "coupled":
            self.abstention_prototypes = nn.Parameter(torch.randn(config.num_abstention_prototypes, dim))
        elif config.use_abstention:  # an abstain logit of its own, from the detached embedding and class scores
            self.abstention_head = nn.Sequential(nn.Linear(dim + config.num_classes, ABSTENTION_HIDDEN), nn.GELU(),
                                                 nn.Linear(ABSTENTION_HIDDEN, 1))
        if config.use_uncertainty_weighting:
            self.log_sigma = nn.Parameter(torch.zeros(2))
        counts = torch.zeros(config.num_classes) if config.class_counts is None else torch.tensor(
            config.class_counts, dtype=torch.float32)
        self.register_buffer("class_counts", counts)
        self.feature_density = FeatureDensity()  # fitted after training (protohead.pipeline.fit_feature_density)
        if config.use_class_balanced and config.class_counts is None:
            warnings.warn("use_class_balanced=True without class_counts: class weights stay uniform until "
                          "set_class_counts() is called with the training split's counts", UserWarning, stacklevel=2)
        self.objective = PrototypeObjective(config)  # the training loss, built from the config (not state)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("push_image", "push_token", "push_similarity"):  # checkpoints from before the bank owned them
            if prefix + name in state_dict and prefix + "bank." + name not in state_dict:
                state_dict[prefix + "bank." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def push_image(self) -> torch.Tensor:
        """(C, M) training-image index each prototype was pushed onto (−1: never pushed); see the bank."""
        return self.bank.push_image

    @property
    def push_token(self) -> torch.Tensor:
        """(C, M) token index of each prototype's push source (−1: never pushed)."""
        return self.bank.push_token

    @property
    def push_similarity(self) -> torch.Tensor:
        """(C, M) similarity to the push source when pushed (NaN: never pushed)."""
        return self.bank.push_similarity

    # ----------------------------------------------------------------------------------------- state
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HeadOptimal:
        return cls(preset=name, **overrides)

    def set_class_counts(self, counts: torch.Tensor | list[int] | tuple[int, ...]) -> None:
        """Set the dataset-level class counts (C,) used for class weights."""
        counts = torch.as_tensor(counts, dtype=torch.float32)
        if counts.shape != (self.config.num_classes,):
            raise ValueError(f"class counts must have shape ({self.config.num_classes},), got {tuple(counts.shape)}")
        if (counts < 0).any() or not torch.isfinite(counts).all():
            raise ValueError("class counts must be finite and non-negative")
        self.class_counts.copy_(counts.to(self.class_counts.device))

    def class_weights(self) -> torch.Tensor:
        """(C,) class weights from the dataset counts (see :meth:`PrototypeObjective.class_weights`)."""
        return self.objective.class_weights(self.class_counts)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def evidence_kind(self) -> str | None:
        """What ``evidence`` (B, C, M, N) holds: ``similarity`` (patch scoring: each token's similarity to the
        prototype, on the similarity's absolute scale; the score is its maximum or soft-pooled mixture),
        ``attention`` (pooled scoring with attention: head-averaged cross-attention weights, uniform = 1/N;
        they shape the adapted prototype but the logit compares the pooled embedding) or None."""
        if self.config.scoring == "patch":
            return "similarity"
        return "attention" if self.attention is not None else None

    @property
    def valid_mask(self) -> torch.Tensor:
        return self.bank.valid

    # ---------------------------------------------------------------------------------------- forward
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features (..., F) → the prototypes' space (..., D) (projection, LayerNorm, dropout)."""
        return self.proj(features)

    def project_exactly(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`project` without dropout, whatever the mode: how an anchored prototype's source is seen."""
        return self.proj[1](self.proj[0](features))

    def prototype_vectors(self) -> torch.Tensor:
        """(C, M, D) the prototypes the head scores (the bank's, or its anchored source patches projected)."""
        return self.bank.vectors(self.project_exactly)

    def embed(self, pool_features: torch.Tensor, img_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project tokens (B, N, F) and pooled vector (B, F) → ((B, N, D), (B, D))."""
        return self.proj(pool_features), self.proj(img_features)

    def _fused_scoring(self, context: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """Whether pooled scoring goes through :meth:`MixedAttentionBlock.gated_cosine` (parallel mixing, cosine,
        3-way gate): the fused per-sample path that needs no (B, C·M, D) tensor."""
        return (self.config.scoring == "pooled" and self.attention is not None and context is not None
                and self.config.distance == "cosine" and self.attention.fusion == "gate3")

    def _scores(self, prototypes: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, embedding: torch.Tensor,
                scope: str, return_weights: bool, context: tuple[torch.Tensor, torch.Tensor] | None,
                kept_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(C', M, D) bank chunk → similarity, distance (B, C', M) and optional attention (B, C', M, N)."""
        if self.config.scoring == "patch":
            sim, dist, token_map = patch_similarity(tokens, prototypes, self.config.distance,
                                                    self.config.patch_pooling, self.config.patch_sharpness,
                                                    return_map=return_weights)
            return sim, dist, token_map
        if self.attention is None:
            sim, dist = prototype_similarity(embedding, prototypes, self.config.distance)
            return sim, dist, None
        if self._fused_scoring(context):
            sim, weights = self.attention.gated_cosine(prototypes, tokens, embedding, context, return_weights,
                                                       kept_slots=kept_slots)
            return sim, 1.0 - sim, weights
        adapted, weights = self.attention(prototypes, valid, tokens, scope, return_weights, context)
        sim, dist = prototype_similarity(embedding, adapted, self.config.distance)
        return sim, dist, weights

    def prototype_scores(self, tokens: torch.Tensor, embedding: torch.Tensor, return_weights: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Similarity and distance (B, C, M) of projected samples to their adapted prototypes.

        When the per-sample work can be split by class (``scope="class"`` or parallel mixing) and there
        are more than ``checkpoint_chunk_slots`` slots, classes are processed in chunks, activation-
        checkpointed when training, so memory stays bounded at large C. The fused path (parallel mixing,
        cosine, 3-way gate; see :meth:`MixedAttentionBlock.gated_cosine`) is not chunked: it works through the
        prototypes in cache-sized blocks itself and, when training, keeps the per-sample activations of at most
        ``checkpoint_chunk_slots`` slots, recomputing the other blocks' in the backward pass. Without
        attention evidence to return it scores the valid slots only: an unused slot's similarity is never read
        (logits, losses and outputs mask it), so it is set to 0 (distance 1) instead of being computed.
        """
        prototypes, valid = self.prototype_vectors(), self.bank.valid
        scope = self.config.resolved_attention_scope()
        context = None
        if self.attention is not None and self.config.resolved_mixing() == "parallel":
            context = self.attention.bank_context(prototypes, valid, scope)
        num_classes, max_slots, _ = prototypes.shape
        chunk = max(1, self.config.checkpoint_chunk_slots // max_slots)
        use_checkpoint = torch.is_grad_enabled() and self.training
        if self._fused_scoring(context) and fused_path_available(tokens, embedding):
            kept_slots = self.config.checkpoint_chunk_slots if use_checkpoint else None
            if return_weights or bool(valid.all()):
                return self._scores(prototypes, valid, tokens, embedding, scope, return_weights, context,
                                    kept_slots=kept_slots)
            return self._valid_slot_scores(prototypes, valid, tokens, embedding, context, kept_slots)
        splittable = context is not None or scope == "class"
        if self.attention is None or not splittable or num_classes <= chunk:
            return self._scores(prototypes, valid, tokens, embedding, scope, return_weights, context)
        parts = []
        for start in range(0, num_classes, chunk):
            part = slice(start, start + chunk)
            args = (prototypes[part], valid[part], tokens, embedding, scope, return_weights,
                    None if context is None else (context[0][part], context[1][part]))
            parts.append(checkpoint(self._scores, *args, use_reentrant=False) if use_checkpoint
                         else self._scores(*args))
        sims, dists, weights = zip(*parts, strict=True)
        attention = torch.cat(weights, dim=1) if return_weights else None
        return torch.cat(sims, dim=1), torch.cat(dists, dim=1), attention

    def _valid_slot_scores(self, prototypes: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor,
                           embedding: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor], kept_slots: int | None
                           ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Fused path on the valid slots only; unused slots get similarity 0 (distance 1) and no gradient."""
        num_classes, max_slots, dim = prototypes.shape
        index = valid.flatten().nonzero().squeeze(1)  # (P',)
        chosen = [t.reshape(-1, dim).index_select(0, index)[None] for t in (prototypes, *context)]  # (1, P', D)
        sim, _ = self.attention.gated_cosine(chosen[0], tokens, embedding, (chosen[1], chosen[2]),
                                             kept_slots=kept_slots)  # (B, 1, P')
        sim = sim.new_zeros(len(tokens), num_classes * max_slots).index_copy(1, index, sim[:, 0])
        sim = sim.view(-1, num_classes, max_slots)
        return sim, 1.0 - sim, None

    def score(self, pool_features: torch.Tensor, img_features: torch.Tensor, labels: torch.Tensor | None = None,
              return_attention: bool = False) -> tuple[HeadScores, dict[str, Any]]:
        """Validate the inputs and score them: ``(scores, outputs)``.

        ``scores`` (:class:`~protohead.objective.HeadScores`): logits (B, C), distances (B, C, M), abstain logit
        (B,) and the head state the objective reads. ``outputs``: ``uncertainty`` (B,), ``similarities``
        (B, C, M) with unused slots at −inf, ``evidence`` (B, C, M, N) when ``return_attention`` (else None; see
        :attr:`evidence_kind`),
        ``winning_prototype`` (B, C), ``ood_score`` (B,) and, once fitted, ``feature_distance`` (B,) (see
        :func:`protohead.density.ood_outputs`). ``labels`` are only validated here.
        """
        img_features = check_head_inputs(pool_features, img_features, labels, self.config.img_feat_dim,
                                         self.config.num_classes, dtype=self.proj[0].weight.dtype)
        tokens, embedding = self.embed(pool_features, img_features)
        sim, dist, attention = self.prototype_scores(tokens, embedding, return_weights=return_attention)
        valid = self.bank.valid
        best_sim, winner = masked_max(sim, valid)
        temperature = self.temperature
        logits = temperature * best_sim
        abstain_logit = None
        if self.config.use_abstention and self.config.abstention_mode == "coupled":
            abstain_sim, _ = prototype_similarity(embedding, self.abstention_prototypes[None], self.config.distance)
            abstain_logit = temperature * abstain_sim.amax(dim=(1, 2))
            uncertainty = losses.abstention_probability(logits, abstain_logit)
        elif self.config.use_abstention:  # learned from, and scored against, the classifier's detached outputs
            class_scores = logits.detach()
            features = torch.cat([embedding.detach(), class_scores.log_softmax(dim=-1)], dim=-1)
            abstain_logit = self.abstention_head(features).squeeze(-1)
            uncertainty = losses.abstention_probability(class_scores, abstain_logit)
        else:
            uncertainty = 1.0 - logits.softmax(dim=-1).amax(dim=-1)
        state = {"prototypes": self.prototype_vectors(), "valid": valid, "class_counts": self.class_counts,
                 "temperature": temperature}
        if self.config.use_uncertainty_weighting:
            state["log_sigma"] = self.log_sigma
        outputs = {"uncertainty": uncertainty.detach(), **ood_outputs(self.feature_density, img_features, logits),
                   "similarities": sim.detach().masked_fill(~valid, float("-inf")),
                   "evidence": None if attention is None else attention.detach(), "winning_prototype": winner}
        return HeadScores(logits, dist, abstain_logit, state), outputs

    def forward(self, pool_features: torch.Tensor, img_features: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        if labels is None and self.training:
            raise ValueError("labels are required in training mode (call .eval() for inference); "
                             "refusing to return a zero loss")
        scores, outputs = self.score(pool_features, img_features, labels, return_attention=labels is None)
        if labels is None:
            return scores.logits, None, {**outputs, "probabilities": scores.logits.softmax(dim=-1).detach()}
        loss, terms = self.objective(scores, labels)
        return scores.logits, loss, scalar_terms(terms)


class Head(HeadOptimal):
    """Compatibility head: ``forward`` returns ``(logits, loss)``; ``loss`` is ``None`` without labels."""

    def forward(self, pool_features: torch.Tensor, img_features: torch.Tensor,  # type: ignore[override]
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss, _ = super().forward(pool_features, img_features, labels)
        return logits, loss

