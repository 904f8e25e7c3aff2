"""Sharded parameters: per-example quantities of a model sharded with FSDP2 (``fully_shard``).

Under FSDP2 each trainable parameter is a DTensor sharded by rows over the ranks of a 1-D device
mesh (``Shard(0)``, R rows in chunks of ⌈R/W⌉, as ``torch.chunk``). A module's forward pre-hook
all-gathers its parameters into full, *unsharded* parameters that the forward uses; the backward
pass fills their gradients, which FSDP2 reduce-scatters (averaged over the W ranks) into the
sharded ``.grad`` and frees. pergrad needs nothing beyond that:

- the rules read each layer's inputs ``a`` and output gradients ``g``, which are this rank's own:
  its examples' squared norms ‖∇ℓⱼ‖² come out whole, with no gathering of parameters;
- second moments and per-example gradients are built for this rank's rows only (:func:`shard_records`
  restricts a record to rows ``[start, stop)`` before anything of the parameter's size is built);
  merged over ranks (:class:`DistributedPerExample`), a parameter's full-shape second moment of
  this rank's examples exists one parameter at a time and is reduce-scattered at once;
- the checks read autograd's *local* gradient through a hook on the unsharded parameter (the
  gradient of this rank's loss, before the reduce-scatter) and autograd's gradient of one
  example's loss with ``torch.autograd.grad`` on the unsharded parameters, so ``.grad`` is never
  touched.

Memory per rank added by pergrad: the captured (a, g) of the rank's micro-batch, as without
sharding; the results in shard shape (second moments float64: 8 bytes per entry of the rank's
shard); and, while second moments are merged, one float64 temporary of the largest parameter's
full shape.

Index letters: ``n`` examples, ``R`` rows of a parameter (its first axis), ``W`` ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .rules import records
from .rules.records import Dense, Outer, Record, Reduced, Rows

__all__ = ["Sharding", "global_sq_norms", "is_sharded", "local", "shard_records", "sum_over_ranks"]

try:  # torch.distributed.tensor is absent from builds without distributed support
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter of a ``fully_shard`` model)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class _Rows:
    """Rows ``[start, stop)`` of a parameter of ``shape`` that this rank holds, in chunks of ``chunk``."""

    start: int
    stop: int
    chunk: int
    shape: torch.Size

    @property
    def local_shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, *self.shape[1:]))


class Sharding:
    """Where each rank's rows of the sharded parameters lie, and what the checks need from autograd.

    Created by :class:`~pergrad.PerExample` for a model whose trainable parameters are DTensors;
    it hooks the modules that own them to see, at each forward, the unsharded parameters FSDP2
    gathered, and hooks those for this rank's own gradients.

    Args:
        model: the sharded model.
        params: {name: sharded parameter} the trainable parameters.
        direction: ``direction(name, g) -> (x (R,), y (C,))`` the sums check's random direction.

    Raises:
        ValueError: a parameter not sharded as FSDP2 shards by default (``Shard(0)`` on a 1-D mesh:
            HSDP's 2-D mesh and tensor parallelism are not supported), or some parameters sharded
            and others not.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor], direction: Callable):
        plain = [name for name, p in params.items() if not is_sharded(p)]
        if plain:
            raise ValueError(
                f"some trainable parameters are sharded (DTensors) and {plain[:3]} are not: call fully_shard on "
                "the model itself too (the root), so that FSDP2 manages every parameter."
            )
        mesh = next(iter(params.values())).device_mesh
        for name, p in params.items():
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.device_mesh != mesh:
                raise ValueError(
                    f"'{name}' is sharded as {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh: pergrad "
                    "supports FSDP2's default, Shard(0) over one 1-D mesh for all parameters (no HSDP mesh, "
                    "no tensor parallelism)."
                )
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.rows = {name: _rows_of(p, self.rank, self.world) for name, p in params.items()}
        self._direction = direction
        # name -> {id of an owning module: the unsharded parameter it used in the latest forward}: one
        # tensor for most, but a parameter shared by two modules (an embedding tied to the head) may be
        # given to each as a tensor of its own, whose gradients add up
        self._live: dict[str, dict[int, Tensor]] = {}
        self._grad_hooks: dict[str, dict[int, object]] = {}  # name -> {id of the hooked tensor: handle}
        # name -> (‖g‖², xᵀ g y, g summed over the parameter's tensors where it has several) of the backward
        self._local: dict[str, tuple[Tensor, Tensor | None, Tensor | None]] = {}
        self._fired: set[tuple[str, int]] = set()  # (name, id of the tensor) whose gradient the backward gave
        self.recording = False
        self.probing = False
        self._adding = False  # watching backward passes run by someone else: add their gradients up
        owners: dict[int, str] = {id(p): name for name, p in params.items()}
        self._handles = []
        for module in model.modules():
            own = {
                local_name: owners[id(p)]
                for local_name, p in module._parameters.items()
                if p is not None and id(p) in owners
            }
            if own:
                # not prepended: FSDP2's own pre-hook (prepended) has gathered the parameters by then
                self._handles.append(module.register_forward_pre_hook(self._seen_hook(module, own)))

    @staticmethod
    def check_targets(targets) -> None:
        """Raise for a module computed by torch.func that is itself sharded with ``fully_shard``:
        recomputing its forward one example at a time would run FSDP2's hooks (collectives) again.

        Raises:
            UnsupportedModuleError: naming the module.
        """
        from torch.distributed.fsdp import FSDPModule

        from .errors import UnsupportedModuleError
        from .rules.functional import FunctionalRule

        for t in targets:
            if isinstance(t.rule, FunctionalRule) and isinstance(t.module, FSDPModule):
                raise UnsupportedModuleError(
                    f"{t.describe()} would be computed by torch.func, but fully_shard was applied to it: its "
                    "forward cannot be recomputed one example at a time under FSDP2's hooks. Leave "
                    "on_unsupported at 'auto', register a rule for it, or apply fully_shard to its parent "
                    "(or to its submodules) instead."
                )

    @classmethod
    def of(cls, model: nn.Module, params: dict[str, Tensor], direction: Callable) -> Sharding | None:
        """A :class:`Sharding` where any trainable parameter is a DTensor, else None."""
        if not any(is_sharded(p) for p in params.values()):
            return None
        return cls(model, params, direction)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        for hooks in self._grad_hooks.values():
            for h in hooks.values():
                h.remove()
        self._handles.clear()
        self._grad_hooks.clear()
        self._live.clear()

    def _seen_hook(self, module: nn.Module, own: dict[str, str]):
        def hook(mod, args):
            for local_name, name in own.items():
                p = mod._parameters.get(local_name)
                if not isinstance(p, nn.Parameter) or is_sharded(p) or not p.requires_grad:
                    continue  # the shards before FSDP2 gathers them, or a rule's recomputation (torch.func)
                live = self._live.setdefault(name, {})
                live[id(mod)] = p
                current = {id(q): q for q in live.values()}
                hooks = self._grad_hooks.setdefault(name, {})
                for key in [key for key in hooks if key not in current]:  # tensors of an earlier forward
                    hooks.pop(key).remove()
                for key, q in current.items():
                    if key not in hooks:
                        hooks[key] = q.register_hook(self._grad_hook(name, key))

        return hook

    def _tensors(self, name: str) -> list[Tensor]:
        """The distinct unsharded tensors of parameter ``name`` in the latest forward."""
        return list({id(q): q for q in self._live.get(name, {}).values()}.values())

    def _grad_hook(self, name: str, key: int):
        def hook(g: Tensor) -> None:
            if not self.recording:
                return
            if (name, key) in self._fired and not self._adding:  # (not for a leaf)
                raise RuntimeError(f"pergrad internal error: two gradients of '{name}' in one backward pass.")
            self._fired.add((name, key))
            probe = None
            if self.probing:
                x, y = self._direction(name, g)
                probe = x @ g.detach().to(x.dtype).reshape(x.shape[0], -1) @ y
            sq, before, summed = self._local.get(name, (None, None, None))
            if len(self._tensors(name)) > 1 and not self._adding:  # one parameter, several tensors: ‖Σ g‖²
                summed = g.detach().double() if summed is None else summed + g.detach().double()
                sq = summed.square().sum()
            else:  # (watching a framework's passes, Σ ‖g‖²: the sums check's scale only)
                sq = g.detach().double().square().sum() + (0.0 if sq is None else sq)
            if before is not None:
                probe = before if probe is None else probe + before
            self._local[name] = (sq, probe, summed)

        return hook

    def begin_backward(self, probe: bool) -> None:
        """Before a backward pass whose local gradients the engine reads."""
        self._local = {}
        self._fired = set()
        self.recording = True
        self.probing = probe

    def end_backward(self) -> None:
        self.recording = False
        self._local = {name: (sq, probe, None) for name, (sq, probe, _) in self._local.items()}  # sums freed

    def watch(self, on: bool) -> None:
        """From now (``on``) until ``watch(False)``: add up the gradients of this rank's loss in every
        backward pass, run by someone else (a framework's micro-batches), as ‖∇L‖² (a sum over the
        passes) and the sums check's projection xᵀ (Σ ∇L) y. ``watch(False)`` stops adding and keeps
        them for :meth:`local_probes` and :meth:`local_sq_norms`."""
        if on:
            self._local = {}
            self._fired = set()
        self.recording = self.probing = self._adding = on

    def local_sq_norms(self, names, like: Tensor) -> dict[str, Tensor]:
        """{name: ‖∇L‖²} of this rank's own loss L in the last backward (0 where none reached it)."""
        zero = torch.zeros((), dtype=torch.float64, device=like.device)
        return {name: self._local[name][0] if name in self._local else zero for name in names}

    def local_probes(self, names) -> dict[str, Tensor | None]:
        """{name: xᵀ (∇L) y} of this rank's own gradient along the sums check's direction (None where
        no gradient reached the parameter)."""
        return {name: self._local[name][1] if name in self._local else None for name in names}

    def example_grads(self, loss: Tensor, names, retain_graph: bool) -> dict[str, Tensor | None]:
        """{name: ∇ loss} with respect to the unsharded parameters the forward used (full shape, this
        rank's), by ``torch.autograd.grad``: ``.grad`` untouched. Collective (FSDP2 gathers the
        parameters again for the pass): every rank calls it as often as the others."""
        tensors = {name: self._tensors(name) for name in names if self._live.get(name)}
        flat = [q for qs in tensors.values() for q in qs]
        found = iter(torch.autograd.grad(loss, flat, retain_graph=retain_graph, allow_unused=True))
        grads: dict[str, Tensor | None] = {}
        for name, qs in tensors.items():
            parts = [g for g in (next(found) for _ in qs) if g is not None]
            grads[name] = sum(parts[1:], parts[0]) if parts else None
        return grads

    # --- shapes and records ----------------------------------------------------------------------

    def local_shape(self, name: str) -> torch.Size:
        return self.rows[name].local_shape

    def local_records(self, name: str, recs: list[Record]) -> list[Record]:
        """The records of this rank's rows of parameter ``name`` (possibly empty)."""
        r = self.rows[name]
        return shard_records(recs, r.start, r.stop, r.shape)

    def second_moment(self, name: str, recs: list[Record], scale: float, param: Tensor) -> Tensor:
        """Σⱼ (∇ℓⱼ)² over the examples of every rank, float64, as a DTensor sharded like the
        parameter: this rank's examples' full-shape moment (one parameter at a time), scaled, then
        reduce-scattered. Collective: every rank calls it for every parameter, in the same order."""
        shape = param.shape
        like = param.to_local()
        full = records.second_moment(recs, shape) * scale**2 if recs else like.new_zeros(shape)
        return self.to_dtensor(self.reduce_scatter_rows(name, full.double()), param)

    def reduce_scatter_rows(self, name: str, full: Tensor) -> Tensor:
        """This rank's rows of the sum over ranks of ``full`` (the parameter's full shape)."""
        rows = self.rows[name]
        flat = full.reshape(full.shape[0], -1)
        padded = flat.new_zeros(self.world * rows.chunk, flat.shape[1])
        padded[: flat.shape[0]] = flat
        out = flat.new_empty(rows.chunk, flat.shape[1])
        dist.reduce_scatter_tensor(out, padded, group=self.group)
        return out[: rows.stop - rows.start].reshape(rows.local_shape)

    @staticmethod
    def to_dtensor(shard: Tensor, like: Tensor) -> Tensor:
        """A DTensor of ``like``'s global shape and placements from this rank's rows ``shard``."""
        return DTensor.from_local(
            shard, like.device_mesh, like.placements, shape=like.shape, stride=_contiguous_strides(like.shape)
        )


def global_sq_norms(tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """{name: ‖t‖²} (0-dim float64, on CPU) of DTensors sharded over one mesh, each rank's shards'
    squares summed over the ranks in ONE ``all_reduce`` (None counts 0). Collective."""
    names = list(tensors)
    sharded = [t for t in tensors.values() if is_sharded(t)]
    parts = [
        torch.zeros((), dtype=torch.float64) if t is None else local(t).detach().double().square().sum().cpu()
        for t in tensors.values()
    ]
    flat = torch.stack(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if sharded:
        flat = sum_over_ranks(flat, sharded[0])
    return dict(zip(names, flat.unbind(), strict=True))


def sum_over_ranks(values: Tensor, like: Tensor) -> Tensor:
    """``values`` (any shape, float64) added over the ranks of ``like``'s mesh (``like`` a DTensor) in
    one ``all_reduce``, returned on CPU. Collective."""
    group = like.device_mesh.get_group()
    flat = values.detach().to("cpu", torch.float64)
    if dist.get_backend(group) == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, group=group)
    return flat.cpu()


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


def _rows_of(p: Tensor, rank: int, world: int) -> _Rows:
    """The rows of ``p`` (a DTensor with ``Shard(0)``) on ``rank``, as ``torch.chunk`` splits them."""
    shape = p.shape
    if len(shape) == 0:
        raise ValueError("a 0-dim sharded parameter: FSDP2 shards along the first axis; give it shape (1,).")
    rows = shape[0]
    chunk = math.ceil(rows / world)
    start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    held = p.to_local().shape[0]
    if held != stop - start:
        raise ValueError(
            f"a parameter of {rows} rows holds {held} on rank {rank} of {world}, not the {stop - start} of "
            "torch.chunk: pergrad supports FSDP2's default sharding (shard_placement_fn unset)."
        )
    return _Rows(start, stop, chunk, shape)


def shard_records(recs: list[Record], start: int, stop: int, shape: torch.Size) -> list[Record]:
    """The records of rows ``[start, stop)`` of a parameter of ``shape``, as records of a parameter
    of shape ``(stop − start, *shape[1:])``; records with no row there are left out.

    An :class:`Outer` record keeps its factors, with the row factors ``u`` cut to the rows; a
    :class:`Rows` record keeps the lookups of those rows (others get a zero gradient row); a
    :class:`Dense` or :class:`Reduced` one is sliced. A grouped Outer record (grouped convolutions)
    is materialised (n, *shape) and sliced.
    """
    out: list[Record] = []
    if stop <= start:  # a rank that holds no row of a small parameter
        return out
    for r in recs:
        if isinstance(r, Outer) and r.groups == 1:
            a, b = r.rows
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                out.append(Outer(r.u[..., lo - a : hi - a], r.v, 1, lo - start))
        elif isinstance(r, Rows):
            inside = (r.index >= start) & (r.index < stop)  # no host read of whether any is
            index = torch.where(inside, r.index - start, torch.zeros_like(r.index))
            out.append(Rows(index, r.g * inside.unsqueeze(-1).to(r.g.dtype)))
        elif isinstance(r, Dense):
            out.append(Dense(r.pieces[:, start:stop]))
        elif isinstance(r, Reduced):
            out.append(Reduced(r.sq, None if r.second is None else r.second[start:stop]))
        else:
            out.append(Dense(records.pieces([r], shape)[:, start:stop]))
    return out
