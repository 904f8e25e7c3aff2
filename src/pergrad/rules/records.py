"""Factored records: what a parameter's per-example pieces *are*, and the one place their math lives.

A rule (and the direct path) says, per parameter and per call, what the per-example pieces
``P_j`` of the batch gradient are (``∇L = Σ_j P_j``; the engine rescales them into gradients of
each example's own loss), in the cheapest exact form it knows:

- :class:`Outer`: a sum of outer products over positions, ``P_j = Σ_t u_jt v_jtᵀ``: Linear,
  unfolded convolutions, attention projections, GPT-2's ``Conv1D``;
- :class:`Rows`: looked-up rows, ``P_j[v] = Σ_{s: idx_js = v} g_js``: embeddings and bags;
- :class:`Dense`: the pieces themselves, (n, *shape), where nothing cheaper exists (norm
  affines and biases, whose pieces are as small as the activations, torch.func);
- :class:`Reduced`: a record already reduced during the backward pass (its squared norms and
  second moments), valid only as a parameter's sole record.

A parameter may get several records: a module called twice, a weight tied between an embedding
and a head, a parameter used by two modules. This module alone turns a parameter's list of
records into its per-example squared norms ``‖Σ_r P_rj‖²`` (each record's own norm plus twice
the cross terms between records, never building an (n, *shape) tensor for Outer and Rows
records), second moments ``Σ_j (Σ_r P_rj)²`` and the pieces ``Σ_r P_rj``.

Index letters: ``n`` examples, ``t``/``s`` positions, ``G`` groups, shapes of a parameter seen as
a matrix ``(R, C)`` (its first axis by the product of the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _sequence as seq

__all__ = [
    "Dense",
    "Outer",
    "Record",
    "Reduced",
    "Rows",
    "distinct_rows",
    "matrix_shape",
    "pieces",
    "probe",
    "second_moment",
    "sq_norms",
]


@dataclass(frozen=True)
class Outer:
    """``P_j = Σ_t u_jt v_jtᵀ``, an (R, C) matrix viewed as the parameter's shape.

    Attributes:
        u: (n·G, t, r) the row factors (a Linear's output gradients ``g``; for GPT-2's
            ``Conv1D``, whose weight is (i, o), its inputs).
        v: (n·G, t, C) the column factors (the inputs ``a``, or the gradients).
        groups: G blocks of rows stacked along the first axis (grouped convolutions): row
            ``j·G + k`` of ``u``/``v`` gives rows ``[k·r, (k+1)·r)`` of example j's piece.
        offset: the first row the record covers (MultiheadAttention's stacked q, k, v blocks),
            ``R`` rows in all; rows outside ``[offset, offset + G·r)`` are zero.
    """

    u: Tensor
    v: Tensor
    groups: int = 1
    offset: int = 0

    @property
    def n(self) -> int:
        return self.u.shape[0] // self.groups

    @property
    def rows(self) -> tuple[int, int]:
        return self.offset, self.offset + self.groups * self.u.shape[2]


@dataclass(frozen=True)
class Rows:
    """``P_j[v] = Σ_{s: index_js = v} g_js`` for a table (V, d); zero rows elsewhere.

    Attributes:
        index: (n, s) looked-up rows (padding positions may hold any valid row: their ``g`` is 0).
        g: (n, s, d) the gradient of the reduced loss with respect to each looked-up row, zero
            where a row gets no gradient (``padding_idx``).
    """

    index: Tensor
    g: Tensor

    @property
    def n(self) -> int:
        return self.index.shape[0]


@dataclass(frozen=True)
class Dense:
    """The pieces themselves, ``pieces`` (n, *shape)."""

    pieces: Tensor

    @property
    def n(self) -> int:
        return self.pieces.shape[0]


@dataclass(frozen=True)
class Reduced:
    """A record reduced while the backward pass built it: ``sq`` (n,) its squared norms,
    ``second`` (*shape) Σⱼ P_j² or None where not asked for. Only a parameter's sole record; its
    pieces' sum is the batch gradient by construction (the backward pass gave it to autograd)."""

    sq: Tensor
    second: Tensor | None = None

    @property
    def n(self) -> int:
        return self.sq.shape[0]


Record = Outer | Rows | Dense | Reduced

#: Entries of materialised pieces built at once where a form has to be materialised to be
#: combined (cross terms of unlike records, second moments of several records).
CHUNK_ELEMENTS = 1 << 22


def sq_norms(records: list[Record], shape: torch.Size) -> Tensor:
    """(n,) ``‖Σ_r P_rj‖²``: each record's squared norms plus twice every cross term."""
    records = _merged(records)
    total = _self_sq(records[0], shape)
    for r in records[1:]:
        total = total + _self_sq(r, shape)
    for k, r in enumerate(records):
        for other in records[k + 1 :]:
            total = total + 2 * _cross(r, other, shape)
    return total


def second_moment(records: list[Record], shape: torch.Size) -> Tensor:
    """(*shape) ``Σ_j (Σ_r P_rj)²``, elementwise."""
    records = _merged(records)
    if len(records) == 1:
        return _self_second(records[0], shape)
    second = _like(records[0]).new_zeros(shape)
    for rows in _example_chunks(records[0].n, shape):
        second += _materialised(records, rows, shape).square_().sum(0)
    return second


def pieces(records: list[Record], shape: torch.Size) -> Tensor:
    """(n, *shape) ``Σ_r P_rj``."""
    records = _merged(records)
    if any(isinstance(r, Reduced) for r in records):
        raise _reduced_error()
    return _materialised(records, slice(0, records[0].n), shape)


def probe(records: list[Record], shape: torch.Size, x: Tensor, y: Tensor) -> Tensor | None:
    """0-dim ``xᵀ (Σ_j Σ_r P_rj) y``: the sum of the pieces, which must be the batch gradient,
    seen along one rank-one direction ``x yᵀ`` of the parameter as an (R, C) matrix (see
    :func:`matrix_shape`); about n·t·(R + C) work, the sum itself never built. None where a
    record does not know its sum.

    Args:
        records: the parameter's records.
        shape: the parameter's shape.
        x: (R,), y: (C,) the direction's factors.
    """
    total = None
    for r in records:
        part = _probe(r, x.to(_like(r).dtype), y.to(_like(r).dtype))
        if part is None:
            return None
        total = part if total is None else total + part
    return total


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(R, C): a parameter's first axis by the product of the others ((1, 1) for a scalar)."""
    rows = shape[0] if len(shape) else 1
    return rows, math.prod(shape) // max(rows, 1)


def _probe(r: Record, x: Tensor, y: Tensor) -> Tensor | None:
    """0-dim ``xᵀ (Σ_j P_j) y`` of one record."""
    if isinstance(r, Outer):
        start, stop = r.rows
        n, G, t = r.n, r.groups, r.u.shape[1]
        ux = torch.einsum("ngtr,gr->ngt", r.u.reshape(n, G, t, -1), x[start:stop].reshape(G, -1))
        vy = torch.einsum("ngtc,c->ngt", r.v.reshape(n, G, t, -1), y)
        return torch.linalg.vecdot(ux.reshape(-1), vy.reshape(-1))
    if isinstance(r, Rows):
        return torch.linalg.vecdot(x[r.index].reshape(-1), (r.g @ y).reshape(-1))
    if isinstance(r, Dense):
        return x @ r.pieces.sum(0).reshape(x.shape[0], -1) @ y
    return None


# --- merging --------------------------------------------------------------------------------


def _merged(records: list[Record]) -> list[Record]:
    """Like records combined into one: Outer records over the same rows by concatenating their
    positions, Rows records by concatenating their lookups, Dense ones by adding."""
    if len(records) == 1:
        return records
    if any(isinstance(r, Reduced) for r in records):
        raise _reduced_error()
    outers: dict[tuple, list[Outer]] = {}
    rows: list[Rows] = []
    dense: list[Dense] = []
    for r in records:
        if isinstance(r, Outer):
            outers.setdefault((r.groups, r.offset, r.u.shape[2], r.v.shape[2]), []).append(r)
        elif isinstance(r, Rows):
            rows.append(r)
        else:
            dense.append(r)
    out: list[Record] = [
        group[0] if len(group) == 1 else Outer(_cat([r.u for r in group]), _cat([r.v for r in group]), *key[:2])
        for key, group in outers.items()
    ]
    if rows:
        out.append(rows[0] if len(rows) == 1 else Rows(_cat([r.index for r in rows]), _cat([r.g for r in rows])))
    if dense:
        total = dense[0].pieces
        for d in dense[1:]:
            total = total + d.pieces
        out.append(Dense(total))
    return out


def _cat(tensors: list[Tensor]) -> Tensor:
    """Concatenated along the positions axis (1), in a common dtype."""
    dtype = torch.promote_types(*(t.dtype for t in tensors)) if len(tensors) > 1 else tensors[0].dtype
    return torch.cat([t.to(dtype) for t in tensors], 1)


def _reduced_error() -> RuntimeError:
    return RuntimeError(
        "pergrad internal error: a record reduced during the backward pass met another record of the "
        "same parameter. Please report the model."
    )


def distinct_rows(index: Tensor, g: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (example, row) pairs looked up, and their gradient rows summed over repeats.

    The keys ``j·V + idx_js`` are sorted and each run of equal keys summed into one row, with no
    size that depends on the data (no host synchronisation on CUDA): there are always n·s rows,
    the unused ones zero (with example and row 0, where adding them changes nothing).

    Args:
        index: (n, s) looked-up rows.
        g: (n, s, d) gradients of the reduced loss with respect to the looked-up rows.
        vocab: number of rows of the table, V.

    Returns:
        example (n·s,), row (n·s,), rows (n·s, d) with ``rows[k] = Σ g`` over the positions of
        ``example[k]`` that look up ``row[k]``.
    """
    n, d = index.shape[0], g.shape[-1]
    keys = (torch.arange(n, device=index.device).unsqueeze(1) * vocab + index).reshape(-1)
    keys, order = keys.sort()
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    run = starts.cumsum(0) - 1  # (n·s,) the run of equal keys each sorted position belongs to
    run_of_position = torch.empty_like(run).scatter_(0, order, run)
    g = g.reshape(-1, d)
    rows = g.new_zeros(g.shape).index_add_(0, run_of_position, g)
    run_keys = torch.zeros_like(keys).scatter_(0, run, keys)
    return run_keys // vocab, run_keys % vocab, rows


# --- one record -----------------------------------------------------------------------------


def _self_sq(r: Record, shape: torch.Size) -> Tensor:
    """(n,) ‖P_j‖² of one record."""
    if isinstance(r, Outer):
        sq = seq.weight_sq_norms(r.v, r.u)
        return sq if r.groups == 1 else sq.reshape(r.n, r.groups).sum(1)
    if isinstance(r, Rows):
        example, _, rows = distinct_rows(r.index, r.g, shape[0])
        return r.g.new_zeros(r.n).index_add_(0, example, seq.row_sq_norms(rows))
    if isinstance(r, Dense):
        return seq.row_sq_norms(r.pieces.reshape(r.n, -1))
    return r.sq


def _self_second(r: Record, shape: torch.Size) -> Tensor:
    """(*shape) Σⱼ P_j² of one record."""
    if isinstance(r, Outer) and r.groups == 1:
        block = seq.weight_second_moment(r.v, r.u)  # (r, C)
        return _placed(block.unsqueeze(0), r, shape).reshape(shape)
    if isinstance(r, Rows):
        _, index, rows = distinct_rows(r.index, r.g, shape[0])
        return r.g.new_zeros(shape[0], math.prod(shape[1:])).index_add_(0, index, rows.square()).reshape(shape)
    if isinstance(r, Dense):
        return r.pieces.square().sum(0)
    if isinstance(r, Reduced):
        if r.second is None:
            raise RuntimeError("pergrad internal error: second moments were not kept in the backward pass.")
        return r.second
    second = r.u.new_zeros(shape)
    for rows in _example_chunks(r.n, shape):
        second += _materialised([r], rows, shape).square_().sum(0)
    return second


def _materialised(records: list[Record], rows: slice, shape: torch.Size) -> Tensor:
    """(c, *shape) ``Σ_r P_rj`` for the examples ``rows``."""
    out = None
    for r in records:
        piece = _materialise(r, rows, shape)
        out = piece if out is None else out + piece
    return out


def _materialise(r: Record, rows: slice, shape: torch.Size) -> Tensor:
    """(c, *shape) the pieces of one record for the examples ``rows``."""
    if isinstance(r, Dense):
        return r.pieces[rows]
    if isinstance(r, Rows):
        index, g = r.index[rows], r.g[rows]
        c, s = index.shape
        out = g.new_zeros(c, shape[0], math.prod(shape[1:]))
        example = torch.arange(c, device=index.device).unsqueeze(1).expand(c, s)
        return out.index_put_((example, index), g, accumulate=True).reshape(c, *shape)
    if isinstance(r, Outer):
        G = r.groups
        block = seq.weight_grads(r.v[rows.start * G : rows.stop * G], r.u[rows.start * G : rows.stop * G])
        return _placed(block.reshape(-1, G * r.u.shape[2], r.v.shape[2]), r, shape).reshape(-1, *shape)
    raise _reduced_error()


def _placed(block: Tensor, r: Outer, shape: torch.Size) -> Tensor:
    """(c, rows, C) pieces of an Outer record's rows, inside zeros of the parameter's (R, C)."""
    start, stop = r.rows
    if (start, stop) == (0, shape[0]):
        return block
    out = block.new_zeros(block.shape[0], shape[0], block.shape[2])
    out[:, start:stop] = block
    return out


# --- cross terms ------------------------------------------------------------------------------


def _cross(r: Record, s: Record, shape: torch.Size) -> Tensor:
    """(n,) ⟨P_rj, P_sj⟩ between two unlike records of one parameter (see :func:`_merged`)."""
    if isinstance(s, Outer) and not isinstance(r, Outer):
        r, s = s, r
    if isinstance(r, Outer) and isinstance(s, Outer):
        (a, b), (c, d) = r.rows, s.rows
        if b <= c or d <= a:  # disjoint rows
            return r.u.new_zeros(r.n)
    if isinstance(r, Outer) and isinstance(s, Rows) and r.groups == 1 and r.rows == (0, shape[0]):
        return _outer_rows_cross(r, s)
    total = None  # anything else: materialised a chunk of examples at a time, then dotted
    for rows in _example_chunks(r.n, shape):
        part = torch.linalg.vecdot(
            _materialise(r, rows, shape).reshape(rows.stop - rows.start, -1),
            _materialise(s, rows, shape).reshape(rows.stop - rows.start, -1),
        )
        total = part if total is None else torch.cat([total, part])
    return total


def _outer_rows_cross(r: Outer, s: Rows) -> Tensor:
    """(n,) ⟨Σ_t u_t v_tᵀ, rows⟩ = Σ_s Σ_t u_t[idx_s] (v_t·g_s): an embedding tied to a head, where
    u is the head's output gradient (n, t, V) and v its input (n, t, d); about n·t·s·d work and
    n·t·s memory, never an (n, V, d) tensor."""
    t = r.u.shape[1]
    vg = torch.bmm(r.v, s.g.transpose(1, 2).to(r.v.dtype))  # (n, t, s)
    ug = torch.gather(r.u, 2, s.index.unsqueeze(1).expand(-1, t, -1))  # (n, t, s)
    return torch.linalg.vecdot(ug.reshape(r.n, -1), vg.reshape(r.n, -1))


def _example_chunks(n: int, shape: torch.Size):
    """Slices of examples whose materialised pieces hold about ``CHUNK_ELEMENTS`` entries."""
    per_example = max(1, math.prod(shape))
    chunk = max(1, CHUNK_ELEMENTS // per_example)
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _like(r: Record) -> Tensor:
    """A tensor of the record's dtype and device."""
    return r.u if isinstance(r, Outer) else r.g if isinstance(r, Rows) else r.pieces if isinstance(r, Dense) else r.sq
