"""Normalisation layers with an elementwise affine map: ``y = â ⊙ w + b``.

â is the normalised input, recomputed from the captured input without the affine map (for
LayerNorm, from the mean and reciprocal standard deviation its forward computed anyway). The
per-example pieces are ``Σ g ⊙ â`` (weight) and ``Σ g`` (bias), summed over every axis that
shares one weight entry (positions, and the spatial axes of GroupNorm/BatchNorm). They are
small (n × number of weights), so they are always materialised.

- LayerNorm / RMSNorm: input (n, *, *normalized_shape); weights have normalized_shape.
- GroupNorm / BatchNorm (eval): input (n, c, *spatial); weights have shape (c,).
BatchNorm in training mode normalises with the batch's own statistics, which couples the
examples: it is refused (see :meth:`BatchNormRule.check`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Call, Rule, register_rule
from .records import Dense


class _AffineNormRule(Rule):
    """Shared shape of the rules: subclasses say how to normalise and how to fold axes."""

    def normalised(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input normalised without the affine map, same shape as ``x``."""
        raise NotImplementedError

    def fold(self, module: nn.Module, x: Tensor) -> Tensor:
        """(n, ...) -> (n, *weight.shape): sum over the axes that share a weight entry."""
        raise NotImplementedError

    def normalised_of_call(self, module: nn.Module, call: Call) -> Tensor:
        """The call's normalised input: recomputed by :meth:`normalised`, unless the forward
        exposed its statistics (``mean`` and ``rstd``, broadcastable to the input), from which
        ``(x − mean)·rstd`` costs one pass; a new tensor either way."""
        x = call.args[0]
        if "rstd" in call.internals:
            return x.sub(call.internals["mean"]).mul_(call.internals["rstd"])
        return self.normalised(module, x)

    def records(self, module, calls: list[Call]) -> dict[str, list[Dense]]:
        """Per call, the pieces ``Σ g ⊙ â`` (weight) and ``Σ g`` (bias), (n, *weight.shape):
        no larger than the normalised input, so always materialised."""
        out: dict[str, list[Dense]] = {}
        for call in calls:
            g = call.grad_outputs[0]
            if getattr(module, "weight", None) is not None and module.weight.requires_grad:
                out.setdefault("weight", []).append(
                    Dense(self.fold(module, self.normalised_of_call(module, call).mul_(g)))
                )
            if getattr(module, "bias", None) is not None and module.bias.requires_grad:
                out.setdefault("bias", []).append(Dense(self.fold(module, g)))
        return out


class _LastAxesRule(_AffineNormRule):
    """Weights over the trailing ``normalized_shape`` axes (LayerNorm, RMSNorm)."""

    flattens_positions = True

    def fold(self, module, x):
        shape = tuple(module.normalized_shape)
        return x.reshape(x.shape[0], -1, *shape).sum(1)


@register_rule(nn.LayerNorm)
class LayerNormRule(_LastAxesRule):
    def normalised(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def exposing_forward(self, module, args, kwargs):
        """``F.layer_norm`` as the op it runs, ``native_layer_norm``, which also returns the
        statistics (n, *, 1…) that the normalised input is rebuilt from; under autocast (which
        casts ``layer_norm`` itself) or with the input by keyword, the module's own forward."""
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, Tensor) or torch.is_autocast_enabled(x.device.type):
            return type(module).forward(module, *args, **kwargs), {}
        out, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
        return out, {"mean": mean, "rstd": rstd}


@register_rule(nn.RMSNorm)
class RMSNormRule(_LastAxesRule):
    def normalised(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class _ChannelRule(_AffineNormRule):
    """Weights over the channel axis 1 (GroupNorm, BatchNorm)."""

    def fold(self, module, x):
        return x.reshape(x.shape[0], x.shape[1], -1).sum(2)


@register_rule(nn.GroupNorm)
class GroupNormRule(_ChannelRule):
    def normalised(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(_ChannelRule):
    def check(self, module):
        if module.training or module.running_mean is None:
            where = "in training mode" if module.training else "without running statistics"
            return (
                f"it normalises with the batch's own statistics {where}, which mixes examples: "
                "per-example gradients are undefined. Use GroupNorm/LayerNorm, or call .eval() "
                "on it (with track_running_stats=True)"
            )
        return None

    def normalised(self, module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)
