"""nn.Embedding: indices (n, *) -> vectors (n, *, d); weight (V, d).

Example j's piece of the weight gradient has one non-zero row per distinct index it uses:
row v is ``Σ_{t: idx_jt = v} g_jt``, summed over repeats, and the row of ``padding_idx`` stays
zero. Norms and second moments are computed over the (example, index) pairs only, about n·t·d
work, never an (n, V, d) tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import Call, Rule, register_rule


def embedding_rows(index: Tensor, g: Tensor, vocab: int, padding_idx: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The (example, index) pairs looked up, and their summed gradient rows.

    The keys ``j·V + idx_jt`` are sorted and each run of equal keys summed into one row, with no
    size that depends on the data (no host synchronisation on CUDA): there are always n·t rows,
    the unused ones zero (with example and index 0, where adding them changes nothing).

    Args:
        index: (n, t) looked-up indices.
        g: (n, t, d) gradients of the reduced loss with respect to the looked-up rows.
        vocab: number of rows of the table, V.
        padding_idx: the row that gets no gradient, or None.

    Returns:
        example (n·t,), index (n·t,), rows (n·t, d) with ``rows[k] = Σ g`` over the positions of
        ``example[k]`` that look up ``index[k]``.
    """
    n, d = index.shape[0], g.shape[-1]
    keys = (torch.arange(n, device=index.device).unsqueeze(1) * vocab + index).reshape(-1)
    g = g.reshape(-1, d)
    if padding_idx is not None:
        g = g * (index.reshape(-1, 1) != padding_idx)
    keys, order = keys.sort()
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    run = starts.cumsum(0) - 1  # (n·t,) the run of equal keys each sorted position belongs to
    run_of_position = torch.empty_like(run).scatter_(0, order, run)
    rows = g.new_zeros(g.shape).index_add_(0, run_of_position, g)
    run_keys = torch.zeros_like(keys).scatter_(0, run, keys)
    return run_keys // vocab, run_keys % vocab, rows


def _rows(module: nn.Embedding, calls: list[Call]) -> tuple[Tensor, Tensor, Tensor, int]:
    """:func:`embedding_rows` over all calls of the module, and n."""
    n = calls[0].args[0].shape[0]
    idx = torch.cat([c.args[0].reshape(n, -1) for c in calls], 1)  # (n, t)
    g = torch.cat([c.grad_outputs[0].reshape(n, -1, module.embedding_dim) for c in calls], 1)
    return (*embedding_rows(idx, g, module.num_embeddings, module.padding_idx), n)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Weight (V, d): per example, gradient rows summed over repeated indices."""

    flattens_positions = True
    lookups_without_examples = True

    def check(self, module):
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True scales each row by its frequency in the whole batch, "
                "which couples examples; construct the Embedding with scale_grad_by_freq=False"
            )
        return None

    def prepare(self, module, calls):
        return _rows(module, calls)

    def per_example_grads(self, module, inputs):
        example, index, rows, n = inputs
        out = rows.new_zeros(n, module.num_embeddings, module.embedding_dim)
        return {"weight": out.index_put_((example, index), rows, accumulate=True)}

    def sq_norms(self, module, inputs):
        example, _, rows, n = inputs
        return {"weight": rows.new_zeros(n).index_add_(0, example, torch.linalg.vector_norm(rows, dim=1).square())}

    def second_moments(self, module, inputs):
        _, index, rows, _ = inputs
        return {"weight": torch.zeros_like(module.weight).index_add_(0, index, rows.square())}
