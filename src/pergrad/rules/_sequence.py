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

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.linalg import vector_norm

from ._registry import workspace

CHUNK_ELEMENTS = 1 << 21  # per-example pieces built at once to be reduced, at most (8 MiB in float32)


def gram_is_cheaper(t: int, i: int, o: int) -> bool:
    """Whether the Gram form costs fewer multiply-adds than materialising, per example."""
    return t * (i + o) < i * o


#: How a weight applied at t > 1 positions gets its per-example squared norms when nothing else
#: needs its pieces: "measured" (default) times both ways once per shape and process (see
#: :func:`build_in_backward`); "gram" and "materialise" force one (tests, benchmarks).
FORM = "measured"
#: Multiply-adds one timing of :func:`build_in_backward` may take, at most (a few ms on a CPU core):
#: wider layers are timed on fewer examples, whose costs scale with n.
TIMING_BUDGET = 1 << 27

# (device type, dtype, t rounded down to a power of two, i, o) -> whether building is faster
_BUILD_IS_FASTER: dict[tuple, bool] = {}


def build_in_backward(x: Tensor, o: int) -> bool:
    """Whether to build a weight's per-example pieces ``P_j`` during the backward pass, reduced
    at once (:func:`reduced_pieces`; their sum then *is* the batch gradient, which autograd no
    longer computes), rather than let autograd compute the batch gradient and take the norms
    afterwards by :func:`weight_sq_norms` (the Gram form where it has fewer multiply-adds).

    Both do the weight gradient's n·t·i·o multiply-adds or more; which is faster depends on how
    well the machine runs a batched matmul with a short inner dimension t against one large
    matmul, and no fixed model gets that right across CPUs and GPUs (on a 2-core EPYC at t = 64
    the batched pieces take 1.6-2.3x the time of the matmul they replace, the Gram form 0.6-1.4x
    it, depending on the widths). So both are timed, once per process for each (device, dtype, t up to a power of two,
    i, o), on the call's own input and at most ``TIMING_BUDGET`` multiply-adds (a few examples
    of a wide layer), and the faster is kept. The result is exact either way.

    Args:
        x: (n, *, i) the layer's input, t > 1 positions in ``*``.
        o: the layer's output width.
    """
    if FORM != "measured":
        return FORM == "materialise"
    n, i = x.shape[0], x.shape[-1]
    t = x.numel() // max(1, n * i)
    key = (x.device.type, x.dtype, 1 << (t.bit_length() - 1), i, o)
    faster = _BUILD_IS_FASTER.get(key)
    if faster is None:
        c = max(1, min(n, TIMING_BUDGET // max(1, t * i * o)))
        with torch.no_grad():
            a = x[:c].detach().reshape(c, t, i)
            g = a.new_ones(c, t, o)  # values do not change the cost (ones: no subnormals)
            flat_a, flat_g = a.reshape(-1, i), g.reshape(-1, o)
            built = _seconds(lambda: reduced_pieces(a, g), a)
            later = _seconds(lambda: (flat_g.T @ flat_a, weight_sq_norms(a, g)), a)
        faster = _BUILD_IS_FASTER[key] = built < later
    return faster


def _seconds(work, like: Tensor, repeats: int = 5) -> float:
    """The median of ``repeats`` timings of ``work()``, after one untimed run, each started with
    the CPU's caches holding other data (as in a training step, where a layer's inputs were
    written long before its backward reads them)."""
    sync = torch.cuda.synchronize if like.is_cuda else (lambda: None)
    evict = None if like.is_cuda else torch.empty(_evict_bytes() // 4)
    work()
    times = []
    for _ in range(repeats):
        if evict is not None:
            evict.fill_(1.0)
        sync()
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


#: Bytes written between two timings, at most: a virtual machine may report its host's whole
#: last-level cache (480 MiB on a 2-core cloud VM), and writing that before each of a shape's
#: twelve timings made the first step of a 2-layer Llama take 2.5 s (0.44 s with 64 MiB, the
#: same choices but where the two forms are within noise: benchmarks/README.md).
EVICT_BYTES_MAX = 64 << 20
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # Linux sysfs: index*/size


@functools.cache
def _evict_bytes() -> int:
    """Bytes written to push a timing's data out of the CPU's caches: those of its largest cache
    (32 MiB where sysfs cannot be read), at most ``EVICT_BYTES_MAX``."""
    sizes = []
    for index in CPU_CACHES.glob("index*/size"):
        text = index.read_text().strip()
        if text[:-1].isdigit() and text[-1] in "KM":
            sizes.append(int(text[:-1]) << (10 if text[-1] == "K" else 20))
    return min(max(sizes, default=32 << 20), EVICT_BYTES_MAX)


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
    chunk = _chunk_rows(o, i)
    scratch = workspace(min(chunk, m) * o * i, a)
    for start in range(0, m, chunk):
        rows = slice(start, min(start + chunk, m))
        c = rows.stop - start
        yield rows, torch.bmm(g[rows].transpose(1, 2), a[rows], out=scratch[: c * o * i].view(c, o, i))


def _chunk_rows(o: int, i: int) -> int:
    """Rows (examples) whose (o, i) pieces :func:`piece_chunks` builds at once."""
    return max(1, CHUNK_ELEMENTS // (o * i))


def reduced_pieces(a: Tensor, g: Tensor, second: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(m, t, i), (m, t, o) -> the pieces ``P_j`` built a chunk at a time and reduced at once:
    their sum ``Σ_j P_j`` (o, i), squared norms ``‖P_j‖²`` (m,), and with ``second`` their
    elementwise second moment ``Σ_j P_j²`` (o, i) (else None). No (m, o, i) tensor is built."""
    m, o, i = a.shape[0], g.shape[2], a.shape[2]
    if 0 < m <= _chunk_rows(o, i):  # one chunk (the usual case): reduced straight from it
        ((_, pieces),) = piece_chunks(a, g)
        return pieces.sum(0), row_sq_norms(pieces.view(m, -1)), pieces.square_().sum(0) if second else None
    grad, sq, moment = a.new_zeros(o, i), a.new_zeros(m), a.new_zeros(o, i) if second else None
    for rows, pieces in piece_chunks(a, g):
        grad += pieces.sum(0)
        sq[rows] = row_sq_norms(pieces.view(pieces.shape[0], -1))
        if moment is not None:
            moment += pieces.square_().sum(0)
    return grad, sq, moment


def weight_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """(m, t, i), (m, t, o) -> (m,): ``‖Σ_t g_jt a_jtᵀ‖²``, by the cheaper of two exact forms."""
    m, t, i = a.shape
    if t == 1:
        return (vector_norm(a, dim=(1, 2)) * vector_norm(g, dim=(1, 2))).square()  # ‖a‖²‖g‖²
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
        return g.select(1, 0).square().T @ a.select(1, 0).square()
    second = a.new_zeros(g.shape[2], a.shape[2])
    for _, pieces in piece_chunks(a, g):
        second += pieces.square_().sum(0)
    return second


def bias_grads(g: Tensor) -> Tensor:
    """(m, t, o) -> (m, o): ``Σ_t g_jt``."""
    return g.select(1, 0) if g.shape[1] == 1 else g.sum(1)
