"""Additivity, checked: does the loss of example i depend only on example i?

Per-example gradients (and every noise statistic built on them) assume the batch loss is a sum
of independent terms, ℓ = Σᵢ ℓᵢ(xᵢ). Whatever mixes examples (BatchNorm in training mode,
centring over the batch, in-batch negatives in a contrastive loss) breaks that: the batch
gradient is no longer an average of independent per-example gradients.

The probe does not look at layer types. In float64, on a copy of the model, for a few probe
examples i it takes ∂ℓᵢ/∂x (rows j≠i must vanish), then names the culprits with the same test
on the loss alone (∂ℓᵢ/∂outputs) and on each module alone (∂(vᵢ·outᵢ)/∂in, v random).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["AdditivityReport", "check_additivity"]

_LOSS = "loss"
_ROOT = "(model)"


@dataclass(frozen=True)
class AdditivityReport:
    """Whether examples are coupled on one batch, and by what.

    A leak is the relative cross-example influence: for probe example i, the largest row norm
    ``‖∂fᵢ/∂inⱼ‖`` over j≠i divided by the largest over all j (0 when n = 1 or nothing depends
    on the input).

    Attributes:
        passed: every leak within ``tol``: the batch loss is a sum of per-example terms.
        culprits: module paths (e.g. ``"net.1"``; ``"(model)"`` for the top module's own forward)
            and/or ``"loss"`` that couple examples; innermost modules only.
        max_leak: largest leak of the whole model plus loss (∂ℓᵢ/∂xⱼ, j≠i).
        loss_leak: largest leak of the loss alone (∂ℓᵢ/∂outputⱼ), None if the output is not a tensor.
        module_leaks: {path: largest leak} for every module probed.
        unprobed: paths of modules that could not be probed alone (non-float input, or not batch-first).
        n: examples in the batch.
        n_probed: probe examples i used.
        tol: the tolerance on leaks (float64).
    """

    passed: bool
    culprits: list[str]
    max_leak: float
    loss_leak: float | None
    module_leaks: dict[str, float]
    unprobed: list[str]
    n: int
    n_probed: int
    tol: float
    hints: dict[str, str] = field(default_factory=dict)

    @property
    def explanation(self) -> str:
        if self.passed:
            return (
                f"No coupling between examples: for {self.n_probed} probe examples i of {self.n}, the "
                f"gradient of loss i with respect to every other example's input vanishes (largest "
                f"relative leak {self.max_leak:.3g} <= {self.tol:g}). The batch gradient is the average "
                f"of independent per-example gradients."
            )
        text = (
            f"Examples are coupled: the loss of one example depends on other examples in the batch "
            f"(largest relative leak {self.max_leak:.3g} > {self.tol:g}). The batch gradient is then not "
            f"an average of independent per-example gradients, so per-example gradients, and the noise "
            f"statistics built from them (gradient noise scale, SNR), are undefined."
        )
        if self.culprits:
            text += " Culprits: " + " ".join(self.hints[c] for c in self.culprits)
        else:
            text += " No single module or the loss could be named" + (
                f" (not probed alone: {', '.join(self.unprobed)})." if self.unprobed else "."
            )
        return text


def check_additivity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    max_probes: int = 8,
    tol: float = 1e-8,
    seed: int = 0,
) -> AdditivityReport:
    """Test whether the loss of example i depends on the inputs of examples j≠i.

    The model is deep-copied and cast to float64 (the caller's model, its weights and its
    train/eval mode are untouched); the check runs in the model's current mode.

    Args:
        model: the model; examples along the first axis of ``x``.
        x: (n, ...) inputs. Integer inputs (tokens) are probed at the output of the first
            module that returns floats (the embedding).
        y: (n, ...) targets.
        loss_fn: ``loss_fn(outputs, y)`` -> (n,) one loss per example.
        max_probes: at most this many probe examples i, drawn at random.
        tol: largest relative cross-example leak accepted.
        seed: seed for the probe examples and the random output weights v.

    Raises:
        ValueError: ``loss_fn`` does not return one loss per example, or no float input can be probed.
    """
    model = copy.deepcopy(model).to(torch.float64)
    x, y = (t.detach().to(torch.float64) if t.is_floating_point() else t for t in (x, y))
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    probes = torch.randperm(n, generator=gen)[:max_probes].sort().values.tolist()

    paths = {m: p for p, m in reversed(list(model.named_modules()))}  # first name of a shared module
    calls: dict[str, tuple[nn.Module, tuple, dict]] = {}
    probe_in: list[Tensor] = []
    if x.is_floating_point():
        probe_in.append(x.requires_grad_())

    def hook(module, args, kwargs, output):
        path = paths[module]
        calls.setdefault(path, (module, args, kwargs))
        if not probe_in and not any(True for _ in module.children()):
            if isinstance(output, Tensor) and output.is_floating_point() and output.dim() and output.shape[0] == n:
                probe_in.append(output.detach().requires_grad_())
                return probe_in[0]
        return None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        outputs = model(x)
    finally:
        for h in handles:
            h.remove()
    if not probe_in:
        raise ValueError("no float input to probe: x is not float and no module returned a (n, ...) float tensor.")
    losses = loss_fn(outputs, y)
    if losses.shape != (n,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({n},), got {tuple(losses.shape)}: use reduction='none'."
        )
    max_leak = _leak(lambda i: losses[i], probe_in[0], probes)

    loss_leak = None
    if isinstance(outputs, Tensor) and outputs.is_floating_point():
        out_leaf = outputs.detach().requires_grad_()
        losses_alone = loss_fn(out_leaf, y)
        loss_leak = _leak(lambda i: losses_alone[i], out_leaf, probes)

    module_leaks, unprobed = {}, []
    for path, (module, args, kwargs) in calls.items():
        leak = _module_leak(module, args, kwargs, n, probes, gen)
        if leak is None:
            unprobed.append(path or _ROOT)
        else:
            module_leaks[path or _ROOT] = leak

    mixing = [p for p, leak in module_leaks.items() if leak > tol]
    culprits = [p for p in mixing if not any(_inside(q, p) for q in mixing if q != p)]
    hints = {p: _hint(p, model) for p in culprits}
    if loss_leak is not None and loss_leak > tol:
        culprits.append(_LOSS)
        hints[_LOSS] = (
            "'loss': the loss of one example depends on the outputs of other examples (in-batch "
            "negatives, contrastive losses, normalisation over the batch); compute each example's "
            "loss from its own output only."
        )
    leaks = [max_leak, loss_leak or 0.0, *module_leaks.values()]
    return AdditivityReport(
        passed=max(leaks) <= tol,
        culprits=culprits,
        max_leak=max_leak,
        loss_leak=loss_leak,
        module_leaks=module_leaks,
        unprobed=unprobed,
        n=n,
        n_probed=len(probes),
        tol=tol,
        hints=hints,
    )


def _leak(f: Callable[[int], Tensor], inp: Tensor, probes: list[int]) -> float:
    """Largest over probes i of max_{j≠i} ‖∂f(i)/∂inp[j]‖ / max_j ‖∂f(i)/∂inp[j]‖."""
    worst = 0.0
    for i in probes:
        (g,) = torch.autograd.grad(f(i), inp, retain_graph=True, allow_unused=True)
        if g is None:
            continue
        rows = g.reshape(g.shape[0], -1).norm(dim=1)  # (n,)
        top = float(rows.max())
        if top == 0.0:
            continue
        others = torch.cat([rows[:i], rows[i + 1 :]])
        if others.numel():
            worst = max(worst, float(others.max()) / top)
    return worst


def _module_leak(module, args, kwargs, n, probes, gen) -> float | None:
    """Leak of one module run alone on its captured input; None if it cannot be probed."""
    if not args or not isinstance(args[0], Tensor):
        return None
    a = args[0]
    if not a.is_floating_point() or a.dim() == 0 or a.shape[0] != n:
        return None
    a = a.detach().clone().requires_grad_()
    with torch.enable_grad():
        out = module(a, *args[1:], **kwargs)
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, Tensor)), None)
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() == 0 or out.shape[0] != n:
        return None
    if not out.requires_grad:
        return 0.0
    v = torch.randn(out.shape, generator=gen, dtype=out.dtype)  # random weights: no cancellation by symmetry
    return _leak(lambda i: (out[i] * v[i]).sum(), a, probes)


def _inside(inner: str, outer: str) -> bool:
    """Whether path ``inner`` is a strict descendant of ``outer``."""
    return outer == _ROOT or inner.startswith(outer + ".")


def _hint(path: str, model: nn.Module) -> str:
    module = model if path == _ROOT else model.get_submodule(path)
    kind = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        return (
            f"'{path}' ({kind} in training mode) normalises with batch statistics: use "
            "GroupNorm/LayerNorm, or put it in eval mode."
        )
    return (
        f"'{path}' ({kind}): its output for one example depends on other examples' inputs; "
        "make it act on each example separately."
    )
