"""Per-sample mixed attention over the prototype bank.

For each sample independently (no token or prototype of one sample ever meets another sample's):

1. cross:  prototypes attend to the sample's own patch tokens          x₁ = LN(p + CrossAttn(p, t))
2. self:   the adapted prototypes attend to each other                 x₂ = LN(x₁ + SelfAttn(x₁))
3. light:  a second self-attention with half the heads                 x₃ = LN(x₂ + LightAttn(x₂))
4. gate:   per-prototype softmax over the three outputs               g = softmax(W[x₁;x₂;x₃])
5. FFN:    out = LN(f + FFN(f)),  f = g₁x₁ + g₂x₂ + g₃x₃   (``fusion="last"``: f = x₃, head.py's behaviour)

Self-attention runs over all C·M prototypes (``scope="full"``, the document's behaviour, O((C·M)²) per
sample) or within each class (``scope="class"``, O(C·M²), what large C needs). Unused prototype slots
are masked as keys everywhere and dropped by the caller, so they neither influence outputs nor receive
gradient.
"""

from __future__ import annotations

import math

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
    """Prototypes (queries, shared) attend to one sample's tokens (keys/values)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, prototypes: torch.Tensor, tokens: torch.Tensor,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prototypes: (P, D); tokens: (B, N, D) → ((B, P, D), weights (B, P, N) head-averaged or None)."""
        q = _split_heads(self.q(prototypes), self.heads)  # (h, P, d)
        k, v = (_split_heads(t, self.heads) for t in self.kv(tokens).chunk(2, dim=-1))  # (B, h, N, d)
        scores = torch.matmul(q.unsqueeze(0), k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, h, P, N)
        weights = scores.softmax(dim=-1)
        attended = _merge_heads(torch.matmul(self.drop(weights), v))
        return self.out(attended), (weights.mean(dim=1) if return_weights else None)


class MixedAttentionBlock(nn.Module):
    """cross → self → light self → 3-way gate → FFN, per sample."""

    def __init__(self, dim: int, heads: int, dropout: float, ffn_ratio: int, fusion: str = "gate3") -> None:
        super().__init__()
        self.cross = CrossAttention(dim, heads, dropout)
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

    def forward(self, prototypes: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, scope: str,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapt the prototypes to each sample.

        Args:
            prototypes: (C, M, D) bank values (a chunk of classes is fine with ``scope="class"``).
            valid: (C, M) bool.
            tokens: (B, N, D) projected patch tokens.
            scope: ``full`` or ``class``.

        Returns:
            (adapted (B, C, M, D), cross-attention weights (B, C, M, N) or None).
        """
        num_classes, max_slots, dim = prototypes.shape
        cross, weights = self.cross(prototypes.reshape(-1, dim), tokens, return_weights)
        x1 = self.norm_cross(prototypes.reshape(1, -1, dim) + self.drop(cross))  # (B, C·M, D)
        batch = x1.shape[0]
        if scope == "full":
            key_mask = valid.reshape(1, 1, 1, -1)
        else:
            x1 = x1.reshape(batch, num_classes, max_slots, dim)
            key_mask = valid.reshape(1, num_classes, 1, 1, max_slots)
        x2 = self.norm_self(x1 + self.drop(self.self_attn(x1, key_mask)))
        x3 = self.norm_light(x2 + self.drop(self.light_attn(x2, key_mask)))
        if self.fusion == "gate3":
            gate = self.gate(torch.cat([x1, x2, x3], dim=-1)).softmax(dim=-1)
            fused = gate[..., 0:1] * x1 + gate[..., 1:2] * x2 + gate[..., 2:3] * x3
        else:
            fused = x3
        out = self.norm_out(fused + self.drop(self.ffn(fused)))
        out = out.reshape(batch, num_classes, max_slots, dim)
        if weights is not None:
            weights = weights.reshape(batch, num_classes, max_slots, -1)
        return out, weights
