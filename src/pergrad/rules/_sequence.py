"""Per-example math for a weight applied at every position: ``y_t = W a_t`` (+ bias).

Shared by Linear (positions = leading dims after the first) and convolutions (positions =
output pixels after unfolding; groups folded into the example axis). Shapes: ``a`` (m, t, i)
inputs, ``g`` (m, t, o) gradients of the reduced loss with respect to the outputs, where
m = n·G rows, G groups per example (1 for Linear). The per-example piece of the weight
gradient is ``P_j = Σ_t g_jt a_jtᵀ`` (o, i); of the bias, ``Σ_t g_jt`` (o,).

Two ways to get ``‖P_j‖²``:
- materialise ``P_j`` and square it: about m·t·i·o multiply-adds, m·o·i memory;
- the Gram form ``‖P_j‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A Aᵀ, G Gᵀ⟩``: about m·t²·(i+o)
  multiply-adds, m·t² memory, no outer product built. With t = 1 it is ``‖a‖²‖g‖²``.
:func:`weight_sq_norms` takes whichever is cheaper for the shapes at hand.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.linalg import vector_norm

from ._registry import workspace

CHUNK_ELEMENTS = 1 << 19  # per-example pieces built at once to be reduced, at most (2 MiB in float32: in cache)


def gram_is_cheaper(t: int, i: int, o: int) -> bool:
    """Whether the Gram form costs fewer multiply-adds than materialising, per example."""
    return t * (i + o) < i * o


#: Cost, in multiply-adds, of one pass over an entry of materialised pieces (summing them into
#: the batch gradient, squaring them): measured on CPU, where a memory pass over (32, 512, 128)
#: float32 pieces takes as long as about 3 multiply-adds per entry in a batched matmul.
PASS_COST = 3
#: Extra cost of a batched matmul of per-example pieces over the single matmul of the batch
#: gradient it replaces, as a fraction of its multiply-adds (small matrices run less efficiently).
BATCHED_OVERHEAD = 0.05


def materialising_in_backward_is_cheaper(t: int, i: int, o: int) -> bool:
    """Whether building the per-example pieces during the backward pass (their sum then *is* the
    batch weight gradient, which autograd no longer computes) costs less than the Gram form
    on top of autograd's gradient, per example.

    Materialising costs the batched matmul's inefficiency, ``BATCHED_OVERHEAD·t·i·o``, plus
    two passes over the i·o entries (the sum into the batch gradient, the squared norm); the
    Gram form, ``t²·(i+o)`` multiply-adds. With t = 1 neither is needed
    (``‖a‖²‖g‖²``).
    """
    return BATCHED_OVERHEAD * t * i * o + 2 * PASS_COST * i * o < t * t * (i + o)


def row_sq_norms(x: Tensor) -> Tensor:
    """(m, k) -> (m,): squared norm of each row."""
    return vector_norm(x, dim=1).square()


def weight_grads(a: Tensor, g: Tensor) -> Tensor:
    """(m, t, i), (m, t, o) -> (m, o, i): ``P_j = Σ_t g_jt a_jtᵀ``."""
    return torch.bmm(g.transpose(1, 2), a)


def piece_chunks(a: Tensor, g: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(m, t, i), (m, t, o) -> the pieces ``P_j = Σ_t g_jt a_jtᵀ`` a chunk of rows at a time:
    (rows, (c, o, i)), at most ``CHUNK_ELEMENTS`` entries, built into one scratch buffer that the
    next chunk overwrites (reduce each chunk before asking for the next; it may be changed)."""
    m, _, i = a.shape
    o = g.shape[2]
    chunk = max(1, CHUNK_ELEMENTS // (o * i))
    scratch = workspace(min(chunk, m) * o * i, a)
    for start in range(0, m, chunk):
        rows = slice(start, min(start + chunk, m))
        c = rows.stop - start
        yield rows, torch.bmm(g[rows].transpose(1, 2), a[rows], out=scratch[: c * o * i].view(c, o, i))


def weight_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """(m, t, i), (m, t, o) -> (m,): ``‖Σ_t g_jt a_jtᵀ‖²``, by the cheaper of two exact forms."""
    m, t, i = a.shape
    if t == 1:
        return row_sq_norms(a[:, 0]) * row_sq_norms(g[:, 0])
    if gram_is_cheaper(t, i, g.shape[2]):
        gram_a = torch.bmm(a, a.transpose(1, 2))  # (m, t, t)
        gram_g = torch.bmm(g, g.transpose(1, 2))  # (m, t, t)
        return torch.linalg.vecdot(gram_a.reshape(m, -1), gram_g.reshape(m, -1))
    sq = a.new_empty(m)
    for rows, pieces in piece_chunks(a, g):
        sq[rows] = row_sq_norms(pieces.view(pieces.shape[0], -1))
    return sq


def weight_second_moment(a: Tensor, g: Tensor) -> Tensor:
    """(m, t, i), (m, t, o) -> (o, i): ``Σ_j P_j²`` (elementwise square)."""
    if a.shape[1] == 1:
        return g[:, 0].square().T @ a[:, 0].square()
    second = a.new_zeros(g.shape[2], a.shape[2])
    for _, pieces in piece_chunks(a, g):
        second += pieces.square_().sum(0)
    return second


def bias_grads(g: Tensor) -> Tensor:
    """(m, t, o) -> (m, o): ``Σ_t g_jt``."""
    return g[:, 0] if g.shape[1] == 1 else g.sum(1)
