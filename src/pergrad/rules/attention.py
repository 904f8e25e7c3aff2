"""nn.MultiheadAttention, batch_first either way.

Its projections are applied functionally inside ``F.multi_head_attention_forward`` (the
``out_proj`` submodule's forward is never called), so no hook sees their inputs. The rule
rebuilds them from the captured call: with ``x_q`` (n, L, E), ``x_k``, ``x_v`` (n, S, ·) the
inputs in batch-first layout, ``q = x_q W_qᵀ + b_q`` (likewise k, v), ``o`` (n, L, E) the
heads' concatenated output and ``g`` (n, L, E) the captured output gradient, each projection
is a weight applied at every position, so the sequence forms of :mod:`._sequence` apply to

    out_proj: (o, g)        q: (x_q, ∂L/∂q)        k: (x_k, ∂L/∂k)        v: (x_v, ∂L/∂v)

where ∂L/∂o = g W_out, and ∂L/∂(q, k, v) come from one backward through the attention core
alone (softmax(q kᵀ/√d + mask) v for the whole batch), recomputed from the captured inputs.
``in_proj_weight`` (3E, E) stacks the q, k, v blocks; their per-example pieces are disjoint
rows, so squared norms add.

Configurations the decomposition does not cover (``add_bias_kv``, ``add_zero_attn``, a loss
that uses the returned attention weights) go through the torch.func rule
(:mod:`.functional`), which is exact but slower. Attention dropout in training mode is
refused: its random mask cannot be reproduced.

Layouts: query/key/value (n, L, E) with ``batch_first`` else (L, n, E); key_padding_mask
(n, S); attn_mask (L, S) shared or (n·heads, L, S); outputs (n, L, E) or (L, n, E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _sequence as seq
from ._registry import Call, register_rule
from .functional import Batched, FunctionalRule
from .records import Dense, Outer, Record

_ARG_NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _arguments(call: Call) -> dict:
    """The call's arguments, all by keyword."""
    kwargs = dict(call.kwargs)
    kwargs.update(zip(_ARG_NAMES, call.args, strict=False))
    return kwargs


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not attended) as an additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _blocks(module: nn.MultiheadAttention) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the projections whose pieces it stacks along its first axis."""
    blocks = {}
    if module._qkv_same_embed_dim:
        blocks["in_proj_weight"] = ("q", "k", "v")
    else:
        blocks.update(q_proj_weight=("q",), k_proj_weight=("k",), v_proj_weight=("v",))
    if module.in_proj_bias is not None:
        blocks["in_proj_bias"] = ("q", "k", "v")
    blocks["out_proj.weight"] = ("out",)
    if module.out_proj.bias is not None:
        blocks["out_proj.bias"] = ("out",)
    return blocks


def _decomposable(module: nn.MultiheadAttention) -> bool:
    """Whether the projections-and-core decomposition covers the module's configuration."""
    return module.bias_k is None and not module.add_zero_attn


def _merged_mask(module: nn.MultiheadAttention, kw: dict, n: int, L: int, S: int, dtype) -> Tensor | None:
    """attn_mask and key_padding_mask as one additive mask broadcastable to (n, heads, L, S)."""
    mask = _additive(kw.get("attn_mask"), dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(n, module.num_heads, L, S)
    padding = _additive(kw.get("key_padding_mask"), dtype)
    if padding is not None:
        padding = padding.reshape(n, 1, 1, S)
        mask = padding if mask is None else mask + padding
    return mask


def _projections(module: nn.MultiheadAttention, x_q: Tensor, x_k: Tensor, x_v: Tensor, detach: bool):
    """q, k, v (n, t, E) from batch-first inputs; one matmul when the three inputs are one tensor."""
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if detach:
        weight = None if weight is None else weight.detach()
        bias = None if bias is None else bias.detach()
    if module._qkv_same_embed_dim and x_q is x_k and x_k is x_v:
        return F.linear(x_q, weight, bias).chunk(3, dim=-1)
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = weight.chunk(3)
    else:
        w_q, w_k, w_v = (
            w.detach() if detach else w for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        )
    b_q, b_k, b_v = (None,) * 3 if bias is None else bias.chunk(3)
    return tuple(F.linear(x, w, b) for x, w, b in ((x_q, w_q, b_q), (x_k, w_k, b_k), (x_v, w_v, b_v)))


def _attention_core(module: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, mask, causal: bool) -> Tensor:
    """softmax(q kᵀ/√d + mask) v per head: (n, L, E), (n, S, E) ×2 -> (n, L, E)."""
    n, L, E = q.shape
    S, heads = k.shape[1], module.num_heads

    def split(t, length):  # (n, length, E) -> (n, heads, length, E/heads)
        return t.reshape(n, length, heads, -1).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(q, L), split(k, S), split(v, S), attn_mask=mask, is_causal=causal)
    return o.transpose(1, 2).reshape(n, L, E)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(FunctionalRule):
    covers_submodules = True

    def check(self, module):
        if module.training and module.dropout > 0:
            return (
                f"attention dropout (p={module.dropout}) draws a random mask that the "
                "per-example pass cannot reproduce; construct it with dropout=0.0 or call .eval()"
            )
        return None

    def _batch_dim(self, module) -> int:
        return 0 if module.batch_first else 1

    example_axis = _batch_dim

    def batch_size(self, module, call):
        query = _arguments(call)["query"]
        if query.dim() != 3:
            raise ValueError(
                "MultiheadAttention was called with unbatched (2-D) inputs; per-example "
                "gradients need a batch: pass (n, L, E) with batch_first=True or (L, n, E)."
            )
        return query.shape[self._batch_dim(module)]

    # --- the torch.func path, for configurations the decomposition does not cover ---

    def input_layout(self, module, call, n):
        kwargs = _arguments(call)
        batched = {k: None for k in kwargs}
        for k in ("query", "key", "value"):
            batched[k] = Batched(self._batch_dim(module))
        if kwargs.get("key_padding_mask") is not None:
            batched["key_padding_mask"] = Batched(0)
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            kwargs["attn_mask"] = mask.reshape(n, module.num_heads, *mask.shape[1:])
            batched["attn_mask"] = Batched(0, keep=False)
        return (), kwargs, (), batched

    def output_layout(self, module, call, index):
        return Batched(self._batch_dim(module) if index == 0 else 0)

    # --- the decomposition ---

    def exposing_forward(self, module, args, kwargs):
        """For calls the decomposition covers and that return no attention weights: the same
        attention computed step by step, exposing q, k, v and the heads' output o (all
        (n, t, ·), batch-first), so that their gradients come from the model's own backward
        pass and nothing is recomputed. Other calls run the module's own forward."""
        kw = dict(kwargs)
        kw.update(zip(_ARG_NAMES, args, strict=False))
        own = type(module).forward
        query = kw.get("query")
        if (
            not _decomposable(module)
            or kw.get("need_weights", True)
            or (module.training and module.dropout > 0)
            or not isinstance(query, Tensor)
            or query.dim() != 3
        ):
            return own(module, *args, **kwargs), {}
        x_q, x_k, x_v = kw["query"], kw["key"], kw["value"]
        if not module.batch_first:
            x_q, x_k, x_v = (t.transpose(0, 1) for t in (x_q, x_k, x_v))
        causal = bool(kw.get("is_causal", False)) and kw.get("attn_mask") is None
        mask = _merged_mask(module, kw, x_q.shape[0], x_q.shape[1], x_k.shape[1], x_q.dtype)
        q, k, v = _projections(module, x_q, x_k, x_v, detach=False)
        o = _attention_core(module, q, k, v, mask, causal)
        out = F.linear(o, module.out_proj.weight, module.out_proj.bias)
        return (out if module.batch_first else out.transpose(0, 1), None), {"q": q, "k": k, "v": v, "o": o.detach()}

    def _sequences(self, module: nn.MultiheadAttention, call: Call) -> dict[str, tuple[Tensor, Tensor]]:
        """Projection name -> (inputs (n, t, i), output gradients (n, t, o)), batch-first."""
        kw = _arguments(call)
        x_q, x_k, x_v, g = kw["query"], kw["key"], kw["value"], call.grad_outputs[0]
        if not module.batch_first:
            x_q, x_k, x_v, g = (t.transpose(0, 1) for t in (x_q, x_k, x_v, g))
        if call.internals:  # exposed by the forward: their gradients came with the backward
            grads = call.internal_grads  # one unreached (e.g. a value no loss depends on) is zero
            g_q, g_k, g_v = (grads[name] if name in grads else torch.zeros_like(call.internals[name]) for name in "qkv")
            return {"q": (x_q, g_q), "k": (x_k, g_k), "v": (x_v, g_v), "out": (call.internals["o"], g)}
        n, L, _ = x_q.shape
        causal = bool(kw.get("is_causal", False)) and kw.get("attn_mask") is None
        mask = _merged_mask(module, kw, n, L, x_k.shape[1], x_q.dtype)
        with torch.enable_grad():
            q, k, v = (t.requires_grad_() for t in _projections(module, x_q, x_k, x_v, detach=True))
            o = _attention_core(module, q, k, v, mask, causal)
            g_q, g_k, g_v = torch.autograd.grad(o, (q, k, v), g @ module.out_proj.weight.detach())
        return {"q": (x_q, g_q), "k": (x_k, g_k), "v": (x_v, g_v), "out": (o.detach(), g)}

    def records(self, module, calls):
        """Per call and projection, an :class:`Outer` record over that projection's block of
        rows (disjoint blocks: no cross terms), and the biases' pieces; torch.func for the
        configurations the decomposition does not cover."""
        if not _decomposable(module) or any(len(c.grad_outputs) > 1 and c.grad_outputs[1] is not None for c in calls):
            return super().records(module, calls)
        blocks = _blocks(module)
        out: dict[str, list[Record]] = {}
        for call in calls:
            seqs = self._sequences(module, call)
            for name, _ in self.parameters(module):
                if name.endswith("bias"):
                    pieces = torch.cat([seq.bias_grads(seqs[p][1]) for p in blocks[name]], 1)
                    out.setdefault(name, []).append(Dense(pieces))
                    continue
                offset = 0
                for p in blocks[name]:
                    a, g = seqs[p]
                    out.setdefault(name, []).append(Outer(g, a, offset=offset))
                    offset += g.shape[2]
        return out
