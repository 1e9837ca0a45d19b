"""One typed configuration for the head, and the preset table.

Every knob of :class:`~protohead.head.HeadOptimal` lives in :class:`HeadConfig`; a preset is a named
set of overrides. ``PRESET_DESCRIPTIONS`` says in one line what each preset turns on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Distance = Literal["cosine", "cosine01", "l2", "log_activation"]
AttentionScope = Literal["full", "class", "auto"]
Mixing = Literal["sequential", "parallel", "auto"]

# Self-attention over all C·M prototypes costs O((C·M)²) per sample. Measured in BENCHMARKS.md:
# up to this many prototype slots the full form is affordable; beyond it "auto" attends within classes.
AUTO_FULL_SCOPE_MAX_SLOTS = 128


@dataclass
class HeadConfig:
    """Configuration of a multi-prototype head. Defaults are the design document's (§4.1, §7.4)."""

    num_classes: int = 7
    emb_dim: int = 384
    num_heads: int = 8
    img_feat_dim: int = 384
    num_prototypes: int = 5
    max_prototypes: int = 10
    dropout: float = 0.1
    ffn_ratio: int = 2
    # similarity / logits
    distance: Distance = "cosine"
    temperature: float = 10.0
    learnable_temperature: bool = True
    # scoring: "pooled" compares the pooled embedding with the (attention-adapted) prototypes (the design
    # document's block); "patch" scores each prototype on the image's own patch tokens (ProtoPNet): its best
    # token ("max") or an attention-pooled mixture of tokens weighted by their similarity ("soft"), so the
    # shown patch is the evidence in the logit. Patch scoring uses no attention block.
    scoring: Literal["pooled", "patch"] = "pooled"
    patch_pooling: Literal["max", "soft"] = "max"
    patch_sharpness: float = 10.0  # soft pooling: w = softmax(sharpness · cos(token, prototype)) over tokens
    # attention
    use_attention: bool = True
    attention_scope: AttentionScope = "auto"
    mixing: Mixing = "parallel"
    fusion: Literal["gate3", "last"] = "gate3"
    checkpoint_chunk_slots: int = 2048
    # classification term
    use_ce: bool = True
    focal_gamma: float = 0.0
    logit_adjustment: float = 0.0  # τ of logit-adjusted CE (Menon et al. 2021): train on z + τ·log π
    use_class_balanced: bool = False
    cb_beta: float = 0.9999
    class_counts: tuple[int, ...] | None = None
    # prototype terms
    clst_scale: float = 0.8
    cluster_reduction: Literal["class_mean", "sample_mean"] = "class_mean"  # sample_mean: ProtoPNet's plain mean
    sep_scale: float = 0.08
    separation_form: Literal["margin", "unbounded"] = "margin"
    margin: float = 0.3
    div_scale: float = 0.01
    div_threshold: float = 0.5
    contrastive_scale: float = 0.05
    contrastive_pairs: Literal["different_class", "all"] = "different_class"
    orth_scale: float = 0.0
    # balanced use of a class's prototypes on its own images (Sinkhorn equipartition target, losses/usage.py); 0 = off
    usage_scale: float = 0.0
    usage_sharpness: float = 10.0
    # abstention (ProtoASNet) and uncertainty weighting (Kendall et al.)
    use_abstention: bool = False
    # "detached": the classifier keeps its own (class-balanced) loss; an abstain logit of its own (a small MLP on
    # the detached embedding and class log-probabilities) learns the virtual-prediction NLL from the detached
    # class logits (ConfidNet / SelectiveNet idea). "coupled": the design document's form — the NLL replaces
    # cross-entropy and the abstain logit is T·cos(embedding, abstention prototype).
    abstention_mode: Literal["detached", "coupled"] = "detached"
    abstention_scale: float = 0.7  # λ of the −λ·log(1−α) penalty: ProtoASNet's image setting (the seed used 0.1)
    abstention_payoff: float = 1.0  # o: abstaining pays α/o; 1 = ProtoASNet's form, o ∈ (1, K] with abstention_scale
    # 0 = Deep Gamblers' loss (Liu et al., NeurIPS 2019) — for the abstain output alone in "detached" mode, for the
    # whole (K + 1)-way output as in the paper in "coupled" mode
    num_abstention_prototypes: int = 1
    use_uncertainty_weighting: bool = True
    # dynamic prototypes
    momentum: float = 0.9

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ("num_classes", "emb_dim", "num_heads", "img_feat_dim", "num_prototypes",
                    "max_prototypes", "ffn_ratio", "num_abstention_prototypes", "checkpoint_chunk_slots")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_prototypes > self.max_prototypes:
            raise ValueError(f"num_prototypes ({self.num_prototypes}) exceeds max_prototypes "
                             f"({self.max_prototypes})")
        if self.emb_dim % self.num_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.use_attention and self.num_heads >= 2 and (self.emb_dim // 2) % (self.num_heads // 2):
            raise ValueError("emb_dim must be divisible by num_heads // 2 for the light self-attention")
        choices = {"distance": ("cosine", "cosine01", "l2", "log_activation"),
                   "attention_scope": ("full", "class", "auto"),
                   "mixing": ("sequential", "parallel", "auto"),
                   "fusion": ("gate3", "last"), "separation_form": ("margin", "unbounded"),
                   "contrastive_pairs": ("different_class", "all"), "abstention_mode": ("detached", "coupled"),
                   "cluster_reduction": ("class_mean", "sample_mean"), "scoring": ("pooled", "patch"),
                   "patch_pooling": ("max", "soft")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.scoring == "patch" and self.use_attention:
            raise ValueError("scoring='patch' scores the prototypes on the patch tokens directly and has no "
                             "attention block: set use_attention=False (or scoring='pooled')")
        if self.scoring == "patch" and self.patch_pooling == "soft" and self.distance not in ("cosine", "cosine01"):
            raise ValueError("patch_pooling='soft' needs a cosine distance (cosine or cosine01)")
        if not 0 < self.patch_sharpness < math.inf:
            raise ValueError(f"patch_sharpness must be positive and finite, got {self.patch_sharpness}")
        if not 0 < self.usage_sharpness < math.inf:
            raise ValueError(f"usage_sharpness must be positive and finite, got {self.usage_sharpness}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.cb_beta < 1.0:
            raise ValueError(f"cb_beta must be in (0, 1), got {self.cb_beta}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be positive and finite, got {self.temperature}")
        if not 0 <= self.logit_adjustment < math.inf:
            raise ValueError(f"logit_adjustment must be finite and >= 0, got {self.logit_adjustment}")
        if not 1 <= self.abstention_payoff <= self.num_classes:
            raise ValueError(f"abstention_payoff must be in [1, num_classes={self.num_classes}] (abstaining at "
                             f"odds above K pays less than a uniform guess), got {self.abstention_payoff}")
        if self.use_abstention and self.abstention_payoff == 1 and self.abstention_scale == 0:
            raise ValueError("abstention_payoff=1 with abstention_scale=0 rewards abstaining on every sample "
                             "(α → 1): give a penalty (abstention_scale > 0) or a payoff above 1")
        if not 0 <= self.focal_gamma < math.inf:
            raise ValueError(f"focal_gamma must be finite and >= 0, got {self.focal_gamma}")
        if self.class_counts is not None:
            if len(self.class_counts) != self.num_classes:
                raise ValueError(f"class_counts has {len(self.class_counts)} entries, "
                                 f"expected num_classes={self.num_classes}")
            if any(int(n) < 0 for n in self.class_counts):
                raise ValueError("class_counts must be non-negative")
        if not (self.use_ce or self.use_abstention) and self.clst_scale == self.sep_scale == 0:
            raise ValueError("the configuration has no loss term: enable use_ce, use_abstention or a "
                             "prototype term")

    def resolved_attention_scope(self) -> Literal["full", "class"]:
        """``auto`` → ``full`` up to AUTO_FULL_SCOPE_MAX_SLOTS prototype slots, else ``class``."""
        if self.attention_scope != "auto":
            return self.attention_scope
        slots = self.num_classes * self.max_prototypes
        return "full" if slots <= AUTO_FULL_SCOPE_MAX_SLOTS else "class"

    def resolved_mixing(self) -> Literal["sequential", "parallel"]:
        """``auto`` → ``sequential`` up to AUTO_FULL_SCOPE_MAX_SLOTS prototype slots, else ``parallel``."""
        if self.mixing != "auto":
            return self.mixing
        return "sequential" if self.num_classes * self.max_prototypes <= AUTO_FULL_SCOPE_MAX_SLOTS else "parallel"

    def replace(self, **changes: Any) -> HeadConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown head option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["class_counts"] is not None:
            data["class_counts"] = list(data["class_counts"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown head option(s): {sorted(unknown)}")
        data = dict(data)
        if data.get("class_counts") is not None:
            data["class_counts"] = tuple(int(n) for n in data["class_counts"])
        return cls(**data)


_PATCH_SCORING = {"scoring": "patch", "use_attention": False}

_NO_PROTO_EXTRAS = {"div_scale": 0.0, "contrastive_scale": 0.0, "orth_scale": 0.0,
                    "use_uncertainty_weighting": False}

# name -> (one-line description, overrides of HeadConfig)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "basic": ("§7.4 basic: CE (log-σ weighted) + cluster 0.8 + margin sep 0.08 + diversity 0.01 + "
              "different-class contrastive 0.05, cosine", {}),
    "long_tail": ("§7.4 long tail: basic + class-balanced weights (effective number, β=0.9999) on CE and "
                  "cluster", {"use_class_balanced": True, "cb_beta": 0.9999}),
    "uncertainty": ("§7.4 uncertainty: basic + abstention learned beside the classifier (detached "
                    "virtual-prediction NLL, λ = 0.7)", {"use_abstention": True, "abstention_scale": 0.7}),
    "protopnet": ("ProtoPNet (Chen et al. 2019): each prototype scored by its best-matching patch token (max "
                  "pooling), L2 log-activation; CE + cluster 0.8 (plain sample mean) + unbounded separation "
                  "(coefficient −0.08), no extra prototype losses; final push projects onto patches",
                  {**_NO_PROTO_EXTRAS, **_PATCH_SCORING, "patch_pooling": "max", "distance": "log_activation",
                   "separation_form": "unbounded", "sep_scale": -0.08, "cluster_reduction": "sample_mean"}),
    "protoasnet": ("ProtoASNet (Sacha et al., MICCAI 2023): abstention NLL in place of CE (λ = 0.7) + cluster + "
                   "unbounded separation + orthogonality 0.01 within class, cosine similarity (s+1)/2",
                   {**_NO_PROTO_EXTRAS, "distance": "cosine01", "separation_form": "unbounded",
                    "sep_scale": -0.08, "orth_scale": 0.01, "use_abstention": True, "abstention_mode": "coupled",
                    "abstention_scale": 0.7}),
    "patch": ("basic's objective with patch-grounded scoring: each prototype scored on the image's own patch "
              "tokens (soft pooling, sharpness 10), anchored on its source patch by the final push, so the shown "
              "patch is the evidence in the logit", {**_PATCH_SCORING, "patch_pooling": "soft"}),
    "head_v1": ("head.py: CE + balanced cluster + margin sep + diversity + ALL-pairs contrastive, log-σ, "
                "gate keeps only the light branch", {"contrastive_pairs": "all", "fusion": "last"}),
    "optimalhead": ("optimalhead.py as intended: NO CE; cluster + margin sep + all-pairs contrastive + "
                    "orthogonality", {"use_ce": False, "div_scale": 0.0, "contrastive_pairs": "all",
                                      "orth_scale": 0.01, "use_uncertainty_weighting": False}),
    "head_fixed": ("head_fixed.py: CE + balanced cluster + margin sep + diversity + different-class "
                   "contrastive, log-σ", {}),
    "optimal": ("head_optimal.py full feature set (§6.2 example): head_fixed + class-balanced weights + "
                "abstention (learned beside the classifier, λ = 0.7)",
                {"use_class_balanced": True, "cb_beta": 0.9999, "use_abstention": True, "abstention_scale": 0.7}),
}

PRESET_DESCRIPTIONS: dict[str, str] = {name: description for name, (description, _) in PRESETS.items()}


def preset_config(name: str, **overrides: Any) -> HeadConfig:
    """The :class:`HeadConfig` of preset ``name`` with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return HeadConfig().replace(**{**PRESETS[name][1], **overrides})
