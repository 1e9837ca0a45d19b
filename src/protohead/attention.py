"""Per-sample mixed attention over the prototype bank.

For each sample independently (no token or prototype of one sample ever meets another sample's),
the prototypes cross-attend to the sample's own patch tokens, self-attention and a light self-attention
(half the heads) relate the prototypes, a per-prototype 3-way softmax gate fuses the three outputs, and
an FFN + LayerNorm follows. Two orderings (``mixing``), see :class:`MixedAttentionBlock`:

- ``sequential``: cross → self → light → gate → FFN, all per sample (the document's block);
- ``parallel``: self → light → FFN on the bank once per step, cross per sample, gate per sample.

Self-attention runs over all C·M prototypes (``scope="full"``, O((C·M)²)) or within each class
(``scope="class"``, O(C·M²)). Unused prototype slots are masked as keys everywhere and dropped by the
caller, so they neither influence outputs nor receive gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, D) → (..., heads, L, D/heads)."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, heads, dim // heads).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, d) → (..., L, heads·d)."""
    *lead, heads, length, dim = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, heads * dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key mask; batch dims are arbitrary."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: (..., L, D); key_mask: bool broadcastable to (..., 1, 1, L) → (..., L, D)."""
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.out(_merge_heads(attended))


class CrossAttention(nn.Module):
    """Prototypes (queries, shared by all samples) attend to one sample's tokens (keys/values).

    Heads are concatenated without an output projection: on the (B, C·M, D) per-sample tensor that
    projection would be the single largest cost of a step (B·C·M·D² multiply-adds), and the following
    LayerNorm, gate and (sequential mixing) self-attention already mix the heads.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, prototypes: torch.Tensor, tokens: torch.Tensor,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prototypes: (P, D); tokens: (B, N, D) → ((B, P, D), weights (B, P, N) head-averaged or None)."""
        q = _split_heads(self.q(prototypes), self.heads)  # (h, P, d), computed once for the batch
        q = q * q.shape[-1] ** -0.5
        k, v = (_split_heads(t, self.heads) for t in self.kv(tokens).chunk(2, dim=-1))  # (B, h, N, d)
        weights = torch.matmul(q, k.transpose(-1, -2)).softmax(dim=-1)  # (B, h, P, N)
        attended = _merge_heads(torch.matmul(weights, v))
        return attended, (weights.mean(dim=1) if return_weights else None)


class MixedAttentionBlock(nn.Module):
    """Cross, self and light self-attention fused by a per-prototype 3-way gate, then an FFN.

    ``mixing="sequential"`` (the document's block, all per sample): x₁ = cross(p, t), x₂ = self(x₁),
    x₃ = light(x₂), f = gate(x₁, x₂, x₃), out = LN(f + FFN(f)). Cost per sample ∝ C·M·D².

    ``mixing="parallel"`` (scalable): the self and light branches and the FFN run once per step on the
    bank (they do not depend on the sample): s = self(p), l = LN(light(s) + FFN(light(s))); per sample only
    x = cross(p, t) and out = gate(x, s, l). Cost per sample ∝ C·M·N·D, so a step stays cheap at large C.
    """

    def __init__(self, dim: int, heads: int, dropout: float, ffn_ratio: int, fusion: str = "gate3") -> None:
        super().__init__()
        self.cross = CrossAttention(dim, heads)
        self.self_attn = SelfAttention(dim, heads, dropout)
        self.light_attn = SelfAttention(dim, max(1, heads // 2), dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_light = nn.LayerNorm(dim)
        self.gate = nn.Linear(3 * dim, 3)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_ratio * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fusion = fusion

    @staticmethod
    def key_mask(valid: torch.Tensor, scope: str, batched: bool) -> torch.Tensor:
        """Boolean key mask for self-attention over (B?, C·M, D) (full) or (B?, C, M, D) (class)."""
        num_classes, max_slots = valid.shape
        if scope == "full":
            return valid.reshape(*(1,) * batched, 1, 1, -1)
        return valid.reshape(*(1,) * batched, num_classes, 1, 1, max_slots)

    def _self_branches(self, x: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = self.norm_self(x + self.drop(self.self_attn(x, key_mask)))
        x3 = self.norm_light(x2 + self.drop(self.light_attn(x2, key_mask)))
        return x2, x3

    def _fuse(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        if self.fusion == "last":
            return x3.expand_as(x1)
        dim = x1.shape[-1]
        weight = self.gate.weight
        # W[x1; x2; x3] without materialising the concatenation
        logits = (F.linear(x1, weight[:, :dim], self.gate.bias) + F.linear(x2, weight[:, dim:2 * dim])
                  + F.linear(x3, weight[:, 2 * dim:]))
        gate = logits.softmax(dim=-1)
        return gate[..., 0:1] * x1 + gate[..., 1:2] * x2 + gate[..., 2:3] * x3

    def bank_context(self, prototypes: torch.Tensor, valid: torch.Tensor, scope: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parallel mixing: the sample-independent self and light branches, (C, M, D) each."""
        num_classes, max_slots, dim = prototypes.shape
        x = prototypes.reshape(-1, dim) if scope == "full" else prototypes
        s, light = self._self_branches(x, self.key_mask(valid, scope, batched=False))
        light = self.norm_out(light + self.drop(self.ffn(light)))
        return s.reshape(num_classes, max_slots, dim), light.reshape(num_classes, max_slots, dim)

    def gated_cosine(self, prototypes: torch.Tensor, tokens: torch.Tensor, embedding: torch.Tensor,
                     context: tuple[torch.Tensor, torch.Tensor], return_weights: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Parallel mixing + cosine: cos(e, gate(x, s, l)) without materialising the fused prototypes.

        With x = LN(p + cross(p, t)) (B, P, D) and the bank context s, l (P, D), the fused prototype
        f = g₀x + g₁s + g₂l gives e·f = g₀ e·x + g₁ e·s + g₂ e·l and ‖f‖² as a quadratic form in the gate
        over the six pairwise dot products of x, s, l. Only dot products against x are per-sample passes
        over a (B, P, D) tensor, so a step makes a few such passes instead of materialising f (and its
        gradient) several times. Equal to ``prototype_similarity(e, forward(...))`` up to rounding.

        Args:
            prototypes: (C, M, D); tokens: (B, N, D); embedding: (B, D); context: ``bank_context``.

        Returns:
            (cosine similarity (B, C, M), cross-attention weights (B, C, M, N) or None).
        """
        num_classes, max_slots, dim = prototypes.shape
        cross, weights = self.cross(prototypes.reshape(-1, dim), tokens, return_weights)
        x = self.norm_cross(prototypes.reshape(1, -1, dim) + cross)  # (B, P, D)
        s, light = (t.reshape(-1, dim) for t in context)  # (P, D)
        gate_weight = self.gate.weight  # (3, 3D)
        # one pass over x per prototype: [x·s, x·l, W₁x] from (P, B, D) @ (P, D, 5)
        per_prototype = torch.cat([s[:, :, None], light[:, :, None],
                                   gate_weight[:, :dim].t().expand(len(s), dim, 3)], dim=-1)
        x_products = torch.matmul(x.transpose(0, 1), per_prototype).transpose(0, 1)  # (B, P, 5)
        x_s, x_l = x_products[..., 0], x_products[..., 1]
        bank_logits = (F.linear(s, gate_weight[:, dim:2 * dim], self.gate.bias)
                       + F.linear(light, gate_weight[:, 2 * dim:]))  # (P, 3)
        gate = (x_products[..., 2:] + bank_logits).softmax(dim=-1)  # (B, P, 3)
        g0, g1, g2 = gate.unbind(dim=-1)
        unit = F.normalize(embedding, dim=-1)
        e_x = torch.matmul(x, unit[:, :, None]).squeeze(-1)  # (B, P)
        e_s, e_l = unit @ s.t(), unit @ light.t()  # (B, P)
        x_x = x.pow(2).sum(dim=-1)
        s_s, l_l, s_l = s.pow(2).sum(dim=-1), light.pow(2).sum(dim=-1), (s * light).sum(dim=-1)  # (P,)
        dot = g0 * e_x + g1 * e_s + g2 * e_l
        squared_norm = (g0 * g0 * x_x + g1 * g1 * s_s + g2 * g2 * l_l
                        + 2 * (g0 * g1 * x_s + g0 * g2 * x_l + g1 * g2 * s_l))
        sim = dot / squared_norm.clamp_min(1e-24).sqrt()
        batch = x.shape[0]
        if weights is not None:
            weights = weights.reshape(batch, num_classes, max_slots, -1)
        return sim.reshape(batch, num_classes, max_slots), weights

    def forward(self, prototypes: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, scope: str,
                return_weights: bool = False, context: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapt the prototypes to each sample.

        Args:
            prototypes: (C, M, D) bank values (a chunk of classes is fine with ``scope="class"``).
            valid: (C, M) bool.
            tokens: (B, N, D) projected patch tokens.
            scope: ``full`` or ``class`` (self-attention over all prototypes, or within each class).
            context: parallel mixing only: ``bank_context`` for these classes; None → sequential mixing.

        Returns:
            (adapted (B, C, M, D), cross-attention weights (B, C, M, N) or None).
        """
        num_classes, max_slots, dim = prototypes.shape
        cross, weights = self.cross(prototypes.reshape(-1, dim), tokens, return_weights)
        if context is None:
            cross = self.drop(cross)  # parallel mixing skips dropout on its (B, C·M, D) tensors: cost
        x1 = self.norm_cross(prototypes.reshape(1, -1, dim) + cross)  # (B, C·M, D)
        batch = x1.shape[0]
        if context is None:
            if scope == "class":
                x1 = x1.reshape(batch, num_classes, max_slots, dim)
            x2, x3 = self._self_branches(x1, self.key_mask(valid, scope, batched=True))
            fused = self._fuse(x1, x2, x3)
            out = self.norm_out(fused + self.drop(self.ffn(fused)))
        else:
            s, light = (t.reshape(1, -1, dim) for t in context)
            out = self._fuse(x1, s, light)
        out = out.reshape(batch, num_classes, max_slots, dim)
        if weights is not None:
            weights = weights.reshape(batch, num_classes, max_slots, -1)
        return out, weights
