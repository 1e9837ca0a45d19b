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

With parallel mixing and cosine similarity the head scores through :meth:`MixedAttentionBlock.gated_cosine`,
whose per-sample work (cross-attention, LayerNorm and seven dot products per sample and prototype) runs in
:class:`_CrossProducts`: cache-sized blocks of prototypes, a hand-written backward pass, no (B, C·M, D)
tensor ever materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from protohead.validation import autocast_enabled, is_tracing


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, D) → (..., heads, L, D/heads)."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, heads, dim // heads).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, d) → (..., L, heads·d)."""
    *lead, heads, length, dim = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, heads * dim)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the distribution of ``F.dropout``, cheaper to sample on the CPU.

    Each element is kept with probability 1 − p (to within 2⁻³³: the threshold is on 32 random bits, where
    ``bernoulli_`` compares a 24-bit uniform float) and scaled by 1/(1 − p). The mask comes from 32-bit
    integers cut out of ``random_`` 64-bit draws of the default generator (so ``torch.manual_seed`` still fixes
    it): about three times cheaper on the CPU than ``bernoulli_``, which draws and converts one float per
    element. A different random stream than ``F.dropout``, the same distribution; off the CPU, while
    tracing and for p outside (0, 1) it is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or is_tracing(x):
        return F.dropout(x, p, training=True)
    count = x.numel()
    bits = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-(1 << 63), None)
    keep = bits.view(torch.int32)[:count].view(x.shape) >= round(p * 2.0**32) - (1 << 31)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` sampled with :func:`dropout` (same distribution, cheaper mask on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def fused_path_available(*tensors: torch.Tensor) -> bool:
    """Whether :class:`_CrossProducts` may run: eagerly, not while tracing, exporting or compiling (a traced graph
    records the plain operations)."""
    return not is_tracing(*tensors)


BLOCK_ELEMENTS = 1 << 21
"""The fused per-sample attention (:class:`_CrossProducts`) works through the prototypes in blocks of about
this many attention weights (B·heads·N per prototype), so a block's weights, adapted prototypes and their
gradients stay in cache between the operations that use them."""


def _block_size(batch: int, heads: int, num_tokens: int, device: torch.device) -> int:
    if device.type != "cpu":
        return 1 << 30  # one block: accelerators want few large kernels, not cache-sized ones
    return max(8, BLOCK_ELEMENTS // max(1, batch * heads * num_tokens))


class _CrossProducts(torch.autograd.Function):
    """Fused cross-attention → residual → LayerNorm → the seven dot products the gated cosine needs.

    For every sample b and prototype p: x = LN(p + cross(p, tokens_b)) (D) and
    ``[x·s_p, x·l_p, W₁x (3), u_b·x, ‖x‖²]``, where s_p, l_p are per-prototype probes (the bank context), W₁
    the gate's rows for x and u_b the sample's unit embedding. The math is that of
    :meth:`MixedAttentionBlock._cross_products_reference` (equal up to rounding, value and gradient); only the
    evaluation differs:

    - prototypes are processed in cache-sized blocks (:data:`BLOCK_ELEMENTS`): a block's attention weights
      (B·h, P', N) and adapted prototypes (P', B, D) are written once and read from cache by the softmax, the
      value product, the LayerNorm and the seven reductions, never materialised for all prototypes at once;
    - the five dot products with per-prototype vectors (s_p, l_p, W₁'s rows) are one batched product per block;
      ∂loss/∂x is assembled once (that product's transpose, the per-sample term, 2·x for ‖x‖²) and goes through
      one LayerNorm backward, instead of autograd summing the gradients of every use of x over (B, P, D) tensors;
    - ``kept_slots``: the activations of the first blocks, up to that many prototypes, are kept for the backward
      pass; every later block's forward is recomputed there (while it is in cache), so memory stays bounded
      whatever P (what activation checkpointing does, without writing and re-reading a whole chunk's
      activations).

    Every (sample, prototype) value is computed from that sample's own tokens: batch invariance is kept.
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, kv: torch.Tensor, prototypes: torch.Tensor,  # type: ignore[override]
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, s: torch.Tensor, light: torch.Tensor,
                gate_weight: torch.Tensor,
                unit: torch.Tensor, eps: float, block: int, keep: bool, kept_slots: int, return_weights: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (h, P, d), already scaled; kv (B, N, 2D); prototypes, s, light (P, D);
        gate_weight (3, D) (W₁); unit (B, D); ``keep``: save what the backward pass needs (else inference only),
        with the activations of the blocks within the first ``kept_slots`` prototypes
        → products (7, P, B), head-averaged attention weights (B, P, N) (or an empty tensor)."""
        heads, num_slots, _ = queries.shape
        batch, num_tokens, _ = kv.shape
        keys_t, values, values_t = _sample_major(kv, heads, transposed_values=keep)
        products = kv.new_empty(7, num_slots, batch)
        weights_out = kv.new_empty(batch, num_slots, num_tokens) if return_weights else kv.new_empty(0)
        saved = []
        for start in range(0, num_slots, block):
            stop = min(num_slots, start + block)
            _, weights, y, x, mean, rstd = _block_forward(queries[:, start:stop], keys_t, values,
                                                          prototypes[start:stop], ln_weight, ln_bias, eps)
            probes = _block_probes(s[start:stop], light[start:stop], gate_weight)
            products[0:5, start:stop] = torch.bmm(x, probes).permute(2, 0, 1)
            products[5, start:stop] = torch.bmm(x.transpose(0, 1), unit[:, :, None]).squeeze(-1).t()
            products[6, start:stop] = (x * x).sum(dim=-1)
            if return_weights:
                weights_out[:, start:stop] = weights.view(batch, heads, stop - start, num_tokens).mean(dim=1)
            if keep and stop <= kept_slots:
                saved += [weights, y, x, mean, rstd]
        if keep:
            ctx.save_for_backward(queries, kv, prototypes, ln_weight, ln_bias, s, light, gate_weight, unit, keys_t,
                                  values, values_t, *saved)
            ctx.options = (eps, block, kept_slots)
        ctx.mark_non_differentiable(weights_out)
        return products, weights_out

    @staticmethod
    def backward(ctx, grad_products: torch.Tensor, _grad_weights: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]:
        (queries, kv, prototypes, ln_weight, ln_bias, s, light, gate_weight, unit, keys_t, values, values_t,
         *saved) = ctx.saved_tensors
        eps, block, kept_slots = ctx.options
        heads, num_slots, head_dim = queries.shape
        batch, num_tokens, _ = kv.shape
        dim = heads * head_dim
        keys = keys_t.transpose(1, 2)
        grad_queries = torch.empty_like(queries)
        grad_keys, grad_values = torch.empty_like(values), torch.empty_like(values)  # (B·h, N, d)
        grad_prototypes, grad_s, grad_light = (torch.empty_like(t) for t in (prototypes, s, light))
        grad_ln_weight, grad_ln_bias = torch.zeros_like(ln_weight), torch.zeros_like(ln_bias)
        grad_gate, grad_unit = torch.zeros_like(gate_weight), torch.zeros_like(unit)
        for index, start in enumerate(range(0, num_slots, block)):
            stop = min(num_slots, start + block)
            size = stop - start
            block_queries = queries[:, start:stop]
            if stop > kept_slots:
                expanded, weights, y, x, mean, rstd = _block_forward(block_queries, keys_t, values,
                                                                     prototypes[start:stop], ln_weight, ln_bias, eps)
            else:
                expanded = _expand(block_queries, batch)
                weights, y, x, mean, rstd = saved[5 * index:5 * index + 5]
            grad = grad_products[:, start:stop].permute(1, 2, 0).contiguous()  # (P', B, 7)
            grad_sample = grad[..., 5:6]  # (P', B, 1)
            # ∂/∂x of Σ g·products: per-prototype probes and gate rows, the sample's unit vector, 2·x
            probes = _block_probes(s[start:stop], light[start:stop], gate_weight)  # (P', D, 5)
            grad_x = torch.bmm(grad[..., :5], probes.transpose(1, 2))
            grad_x.addcmul_(grad_sample, unit)
            grad_x.addcmul_(x, grad[..., 6:], value=2.0)  # (P', B, D)
            grad_block_probes = torch.bmm(x.transpose(1, 2), grad[..., :5])  # (P', D, 5)
            grad_s[start:stop], grad_light[start:stop] = grad_block_probes[..., 0], grad_block_probes[..., 1]
            grad_gate += grad_block_probes[..., 2:].sum(dim=0).t()
            grad_unit[:, None].baddbmm_(grad_sample.permute(1, 2, 0), x.transpose(0, 1))
            grad_y, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_x, y, (dim,), mean, rstd, ln_weight, ln_bias, (True, True, True))
            grad_ln_weight += grad_w
            grad_ln_bias += grad_b
            grad_prototypes[start:stop] = grad_y.sum(dim=1)
            # y = p + Σₙ w·v per (sample, head); w = softmax(q·k)
            grad_attended = grad_y.view(size, batch, heads, head_dim).permute(1, 2, 0, 3).reshape(-1, size, head_dim)
            first = 0.0 if index == 0 else 1.0  # the first block writes the accumulators (beta 0: no zero fill)
            grad_values.baddbmm_(weights.transpose(1, 2), grad_attended, beta=first)
            grad_scores = torch._softmax_backward_data(torch.bmm(grad_attended, values_t), weights, -1, weights.dtype)
            grad_keys.baddbmm_(grad_scores.transpose(1, 2), expanded, beta=first)
            grad_queries[:, start:stop] = torch.bmm(grad_scores, keys).view(batch, heads, size, head_dim).sum(dim=0)
        grad_kv = kv.new_empty(batch, num_tokens, 2, heads, head_dim)
        for part, grad in enumerate((grad_keys, grad_values)):  # (B·h, N, d) → (B, N, h, d), one copy each
            grad_kv[:, :, part] = grad.view(batch, heads, num_tokens, head_dim).transpose(1, 2)
        grad_kv = grad_kv.view(batch, num_tokens, 2 * dim)
        return (grad_queries, grad_kv, grad_prototypes, grad_ln_weight, grad_ln_bias, grad_s, grad_light, grad_gate,
                grad_unit, None, None, None, None, None)


def _sample_major(kv: torch.Tensor, heads: int, transposed_values: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 2D) keys and values → keys (B·h, d, N), values (B·h, N, d) and, for the backward pass,
    (B·h, d, N) (else an empty tensor): small copies."""
    batch, num_tokens, two_dim = kv.shape
    head_dim = two_dim // 2 // heads
    keys, values = kv.view(batch, num_tokens, 2, heads, head_dim).unbind(dim=2)  # (B, N, h, d) each
    return (keys.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, num_tokens),
            values.transpose(1, 2).reshape(batch * heads, num_tokens, head_dim),
            values.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, num_tokens) if transposed_values
            else kv.new_empty(0))


def _block_probes(s: torch.Tensor, light: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """(P', D) bank context s, l and the (3, D) gate rows → (P', D, 5): five dot products in one pass."""
    size, dim = s.shape
    return torch.cat([s[:, :, None], light[:, :, None], gate_weight.t().expand(size, dim, 3)], dim=-1)


def _expand(queries: torch.Tensor, batch: int) -> torch.Tensor:
    """(h, P', d) → (B·h, P', d): the queries are the same for every sample."""
    heads, size, head_dim = queries.shape
    return queries.expand(batch, heads, size, head_dim).reshape(batch * heads, size, head_dim)


def _block_forward(queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, prototypes: torch.Tensor,
                   ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of prototypes: the queries expanded to (B·h, P', d), weights (B·h, P', N), y = p + cross
    (P', B, D), x = LN(y), mean, rstd."""
    heads, size, head_dim = queries.shape
    batch = keys_t.shape[0] // heads
    expanded = _expand(queries, batch)
    weights = torch.bmm(expanded, keys_t).softmax(dim=-1)  # (B·h, P', N)
    attended = torch.bmm(weights, values)  # (B·h, P', d)
    y = values.new_empty(size, batch, heads * head_dim)
    torch.add(prototypes.view(size, 1, heads, head_dim),
              attended.view(batch, heads, size, head_dim).permute(2, 0, 1, 3), out=y.view(size, batch, heads, head_dim))
    x, mean, rstd = torch.native_layer_norm(y, (heads * head_dim,), ln_weight, ln_bias, eps)
    return expanded, weights, y, x, mean, rstd


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

    def queries(self, prototypes: torch.Tensor) -> torch.Tensor:
        """(P, D) → scaled per-head queries (h, P, d), computed once for the batch."""
        q = _split_heads(self.q(prototypes), self.heads)
        return q * q.shape[-1] ** -0.5

    def forward(self, prototypes: torch.Tensor, tokens: torch.Tensor,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prototypes: (P, D); tokens: (B, N, D) → ((B, P, D), weights (B, P, N) head-averaged or None)."""
        q = self.queries(prototypes)
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
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), Dropout(dropout),
                                 nn.Linear(ffn_ratio * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.drop = Dropout(dropout)
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
                     context: tuple[torch.Tensor, torch.Tensor], return_weights: bool = False,
                     fast: bool | None = None, kept_slots: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Parallel mixing + cosine: cos(e, gate(x, s, l)) without materialising the fused prototypes.

        With x = LN(p + cross(p, t)) (B, P, D) and the bank context s, l (P, D), the fused prototype
        f = g₀x + g₁s + g₂l gives e·f = g₀ e·x + g₁ e·s + g₂ e·l and ‖f‖² as a quadratic form in the gate
        over the six pairwise dot products of x, s, l. Only the dot products against x are per-sample work:
        ``[x·s, x·l, W₁x, e·x, ‖x‖²]`` per (sample, prototype). Equal to
        ``prototype_similarity(e, forward(...))`` up to rounding.

        Args:
            prototypes: (C, M, D); tokens: (B, N, D); embedding: (B, D); context: ``bank_context``.
            fast: compute the per-sample products with the fused, cache-blocked :class:`_CrossProducts`
                (default, except while tracing or exporting: :func:`fused_path_available`) or
                with plain autograd operations (the reference; what a traced graph records).
            kept_slots: fast path only: keep the per-sample activations of at most this many prototypes (the
                first ones) for the backward pass and recompute the others there, block by block (activation
                checkpointing of the per-sample work); None keeps them all.

        Returns:
            (cosine similarity (B, C, M), cross-attention weights (B, C, M, N) or None).
        """
        num_classes, max_slots, dim = prototypes.shape
        flat = prototypes.reshape(-1, dim)
        s, light = (t.reshape(-1, dim) for t in context)  # (P, D)
        gate_weight = self.gate.weight  # (3, 3D)
        unit = F.normalize(embedding, dim=-1)
        if fast is None:
            fast = fused_path_available(tokens, embedding, flat)
        if fast:
            x_products, weights = self._cross_products(flat, tokens, unit, s, light, return_weights, kept_slots)
        else:
            x_products, weights = self._cross_products_reference(flat, tokens, unit, s, light, return_weights)
        # one split (its backward is one concatenation, not a zero-filled (7, P, B) tensor per slice)
        x_s, x_l, x_gate, e_x, x_x = x_products.split([1, 1, 3, 1, 1])  # (1 | 3, P, B)
        bank_logits = (F.linear(s, gate_weight[:, dim:2 * dim], self.gate.bias)
                       + F.linear(light, gate_weight[:, 2 * dim:]))  # (P, 3)
        gate = (x_gate + bank_logits.t()[:, :, None]).softmax(dim=0)  # (3, P, B)
        g0, g1, g2 = gate.split(1)  # (1, P, B) each, as x_s, x_l, e_x, x_x
        e_s, e_l = s @ unit.t(), light @ unit.t()  # (P, B)
        s_s, l_l, s_l = (s.pow(2).sum(dim=-1, keepdim=True), light.pow(2).sum(dim=-1, keepdim=True),
                         (s * light).sum(dim=-1, keepdim=True))  # (P, 1)
        dot = g0 * e_x + g1 * e_s + g2 * e_l
        squared_norm = (g0 * g0 * x_x + g1 * g1 * s_s + g2 * g2 * l_l
                        + 2 * (g0 * g1 * x_s + g0 * g2 * x_l + g1 * g2 * s_l))
        sim = (dot / squared_norm.clamp_min(1e-24).sqrt())[0].t()  # (B, P)
        batch = tokens.shape[0]
        if weights is not None:
            weights = weights.reshape(batch, num_classes, max_slots, -1)
        return sim.reshape(batch, num_classes, max_slots), weights

    def _cross_products(self, prototypes: torch.Tensor, tokens: torch.Tensor, unit: torch.Tensor, s: torch.Tensor,
                        light: torch.Tensor, return_weights: bool, kept_slots: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(7, P, B) ``[x·s, x·l, W₁x (3), u·x, ‖x‖²]`` with x = LN(p + cross(p, t)), via :class:`_CrossProducts`;
        attention weights (B, P, N) head-averaged, or None."""
        dim = prototypes.shape[-1]
        batch, num_tokens, _ = tokens.shape
        queries = self.cross.queries(prototypes)  # (h, P, d)
        kv = self.cross.kv(tokens).contiguous()  # (B, N, 2D)
        norm = self.norm_cross
        inputs = (queries, kv, prototypes, norm.weight, norm.bias, s, light, self.gate.weight[:, :dim], unit)
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        block = _block_size(batch, self.cross.heads, num_tokens, tokens.device)
        kept_slots = len(prototypes) if kept_slots is None else kept_slots
        device_type = tokens.device.type
        if autocast_enabled(device_type):  # the big products (token keys / values) ran in bfloat16 above; the
            # per-sample work (softmax, LayerNorm, dot products) runs in float32, as autocast would run those ops
            inputs = tuple(t.float() for t in inputs)
        with torch.autocast(device_type, enabled=False):
            products, weights = _CrossProducts.apply(*inputs, norm.eps, block, keep, kept_slots, return_weights)
        return products, (weights if return_weights else None)

    def _cross_products_reference(self, prototypes: torch.Tensor, tokens: torch.Tensor, unit: torch.Tensor,
                                  s: torch.Tensor, light: torch.Tensor, return_weights: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What :meth:`_cross_products` computes, with plain autograd operations (materialises (B, P, D))."""
        cross, weights = self.cross(prototypes, tokens, return_weights)
        x = self.norm_cross(prototypes[None] + cross)  # (B, P, D)
        dim = x.shape[-1]
        x_s, x_l = (x * s).sum(dim=-1), (x * light).sum(dim=-1)
        x_gate = F.linear(x, self.gate.weight[:, :dim])  # (B, P, 3)
        e_x = torch.matmul(x, unit[:, :, None]).squeeze(-1)  # (B, P)
        x_x = x.pow(2).sum(dim=-1)
        products = torch.cat([torch.stack([x_s, x_l], dim=-1), x_gate, torch.stack([e_x, x_x], dim=-1)], dim=-1)
        return products.permute(2, 1, 0), weights

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
