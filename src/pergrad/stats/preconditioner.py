"""The diagonal preconditioner of an optimizer, for the preconditioned noise scale B_P.

Adam and AdamW (Kingma and Ba 2015; Loshchilov and Hutter 2019) step by −η m̂ / (√v̂ + ε), with
v̂ = v / (1 − β₂ᵗ) the bias-corrected EMA of squared gradients (its running maximum with
``amsgrad``): the step is −η P m̂ with P = 1 / (√v̂ + ε) elementwise. AdamW's decoupled weight
decay leaves P unchanged. B_P = tr(PΣ) / GᵀPG (:class:`~pergrad.stats.NoiseScale`) is the noise
scale of that geometry.

References:
    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162
    (appendix: preconditioned optimizers).
    Kingma and Ba 2015, "Adam", arXiv:1412.6980.
    Loshchilov and Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["adam_preconditioner"]


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module) -> Callable[[], dict[str, Tensor] | None]:
    """A callable for ``NoiseScale(preconditioner=...)``: Adam's current P = 1/(√v̂ + ε).

    Args:
        optimizer: a ``torch.optim.Adam`` or ``AdamW`` over (some of) ``model``'s parameters.
        model: names the parameters, as ``model.named_parameters()`` does.

    Returns:
        A callable returning {parameter name: P, shaped like the parameter, float64 on the
        parameter's device} from the optimizer's state as it is when called, or None while a
        parameter has no state yet (before the first step). Call it (update the noise scale)
        before ``optimizer.step()`` on the batch: P is then the previous step's, independent of
        the batch it weighs, and tr(PΣ)̂, GᵀPĜ stay unbiased (after the step, v̂ holds that
        batch's own squared gradient: at step 1, v̂ = ḡ² exactly). Parameters of the model that the
        optimizer does not hold are left out (a trainable one then makes the noise scale raise, naming it).

    Raises:
        TypeError: another optimizer (its geometry is not Adam's).
        ValueError: the optimizer holds a parameter that is not ``model``'s.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"adam_preconditioner needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}: "
            "write the callable returning {name: P} for other optimizers."
        )
    names = {p: name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in names:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model: "
                    "pass the model whose parameters the optimizer trains (not a DDP wrapper or a copy)."
                )

    def current() -> dict[str, Tensor] | None:
        out = {}
        for group in optimizer.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state or "exp_avg_sq" not in state:
                    return None
                v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                step = float(state["step"])
                v_hat = v.detach().double() / (1.0 - beta2**step)
                out[names[p]] = 1.0 / (v_hat.sqrt() + eps)
        return out

    return current
