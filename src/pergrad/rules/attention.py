"""nn.MultiheadAttention, batch_first either way, through the torch.func rule.

Its projections are applied functionally inside ``F.multi_head_attention_forward`` (the
``out_proj`` submodule's forward is never called), so no hook sees their inputs; the rule
covers all the module's parameters, ``out_proj``'s included, by differentiating the whole
module per example (see :mod:`.functional`).

Layouts: query/key/value (n, L, E) with ``batch_first`` else (L, n, E); key_padding_mask
(n, S); attn_mask (L, S) shared, or (n·heads, L, S) per example; outputs (n, L, E) or
(L, n, E), and attention weights (n, [heads,] L, S).
"""

from __future__ import annotations

from torch import nn

from ._registry import register_rule
from .functional import Batched, FunctionalRule


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

    def _seq_dim(self, module) -> int:
        return 0 if module.batch_first else 1

    def batch_size(self, module, call):
        query = call.args[0] if call.args else call.kwargs["query"]
        if query.dim() != 3:
            raise ValueError(
                "MultiheadAttention was called with unbatched (2-D) inputs; per-example "
                "gradients need a batch: pass (n, L, E) with batch_first=True or (L, n, E)."
            )
        return query.shape[self._seq_dim(module)]

    def input_layout(self, module, call, n):
        seq = Batched(self._seq_dim(module))
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"]
        kwargs = dict(call.kwargs)
        kwargs.update(zip(names, call.args))  # all by keyword: one place to look them up
        batched = {k: None for k in kwargs}
        for k in ("query", "key", "value"):
            batched[k] = seq
        if kwargs.get("key_padding_mask") is not None:
            batched["key_padding_mask"] = Batched(0)
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            kwargs["attn_mask"] = mask.reshape(n, module.num_heads, *mask.shape[1:])
            batched["attn_mask"] = Batched(0, keep=False)
        return (), kwargs, (), batched

    def output_layout(self, module, index):
        return Batched(self._seq_dim(module) if index == 0 else 0)
