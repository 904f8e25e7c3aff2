"""nn.Embedding and nn.EmbeddingBag: lookups of rows of a table, weight (V, d).

Example j's piece of the weight gradient has one non-zero row per distinct index it uses: a
:class:`~.records.Rows` record of the (index, gradient) pairs it looked up, which the engine sums
over repeats. Norms and second moments cost about n·s·d, never an (n, V, d) tensor.

- Embedding: indices (n, *) -> vectors (n, *, d); row ``v`` of example j's piece is
  ``Σ_{t: idx_jt = v} g_jt``, and ``padding_idx``'s row stays zero.
- EmbeddingBag: one bag per example, 2-D indices (n, s) or 1-D indices with ``offsets`` (n bags,
  of any length); output (n, d). Each entry ``e`` of bag j contributes ``w_e·g_j`` to its row,
  with ``w_e`` the per-sample weight ("sum"), 1/(entries in the bag) ("mean"), and 0 for
  ``padding_idx``; for "max", each output coordinate's gradient goes to the row that won it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import Call, Rule, register_rule
from .records import Rows

__all__ = ["EmbeddingBagRule", "EmbeddingRule", "lookup_rows"]

_FREQ = (
    "scale_grad_by_freq=True scales each row by its frequency in the whole batch, which couples "
    "examples; construct the {} with scale_grad_by_freq=False"
)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Weight (V, d): per example, the looked-up rows' gradients."""

    flattens_positions = True

    def check(self, module):
        return _FREQ.format("Embedding") if module.scale_grad_by_freq else None

    def records(self, module, calls):
        return {"weight": [lookup_rows(c.args[0], c.grad_outputs[0], module.padding_idx) for c in calls]}


def lookup_rows(index: Tensor, g: Tensor, padding_idx: int | None) -> Rows:
    """The Rows record of one embedding lookup: ``index`` (n, *), ``g`` (n, *, d) the gradient of
    the reduced loss with respect to the looked-up vectors; the padding row gets nothing."""
    n = index.shape[0]
    index, g = index.reshape(n, -1), g.reshape(n, index[0].numel(), -1)
    if padding_idx is not None:
        g = g * (index != padding_idx).unsqueeze(2)
    return Rows(index, g)


_MODES = {"sum": 0, "mean": 1, "max": 2}


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(Rule):
    """Weight (V, d): per bag (example), its entries' rows, weighted by the bag's reduction."""

    def check(self, module):
        return _FREQ.format("EmbeddingBag") if module.scale_grad_by_freq else None

    def example_axis(self, module):
        return None  # bags are rows of a 2-D input, or given by offsets

    def batch_size(self, module, call):
        index, offsets, _ = _bag_arguments(call)
        if index.dim() == 2:
            return index.shape[0]
        return offsets.shape[0] - 1 if module.include_last_offset else offsets.shape[0]

    def records(self, module, calls):
        return {"weight": [self._rows(module, c) for c in calls]}

    def _rows(self, module: nn.EmbeddingBag, call: Call) -> Rows:
        """Bag j's entries as row ``s`` of (n, s_max) lookups, zero-padded."""
        index, offsets, weights = _bag_arguments(call)
        g = call.grad_outputs[0]  # (n, d)
        n = g.shape[0]
        if index.dim() == 2:
            s = index.shape[1]
            offsets = torch.arange(0, n * s, s, device=index.device)
            index, weights = index.reshape(-1), None if weights is None else weights.reshape(-1)
        elif module.include_last_offset:
            offsets = offsets[:-1]
        mode = _MODES[module.mode]
        with torch.no_grad():
            _, _, bag_size, max_index = torch.embedding_bag(
                module.weight, index, offsets, False, mode, False, weights, False, module.padding_idx
            )
        if module.mode == "max":  # coordinate c of bag j's gradient goes to row max_index[j, c]
            g = torch.diag_embed(g * (bag_size > 0).unsqueeze(1))  # (n, d, d)
            return Rows(max_index, g)
        bag = torch.searchsorted(offsets, torch.arange(index.shape[0], device=index.device), right=True) - 1
        scale = torch.ones(index.shape[0], dtype=g.dtype, device=g.device) if weights is None else weights.to(g.dtype)
        if module.padding_idx is not None:
            scale = scale * (index != module.padding_idx)
        if module.mode == "mean":
            scale = scale / bag_size.clamp(min=1).to(g.dtype)[bag]
        position = torch.arange(index.shape[0], device=index.device) - offsets[bag]
        width = int(position.max()) + 1 if index.numel() else 1
        rows = index.new_zeros(n, width)
        rows[bag, position] = index
        grads = g.new_zeros(n, width, g.shape[1])
        grads[bag, position] = g[bag] * scale.unsqueeze(1)
        return Rows(rows, grads)


def _bag_arguments(call: Call) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(input, offsets, per_sample_weights) of an EmbeddingBag call."""
    names = ("input", "offsets", "per_sample_weights")
    values = dict(zip(names, call.args, strict=False)) | {k: v for k, v in call.kwargs.items() if k in names}
    return values["input"], values.get("offsets"), values.get("per_sample_weights")
