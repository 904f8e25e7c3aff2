"""nn.Conv1d / Conv2d / Conv3d: stride, padding (numbers or "same"), padding modes, dilation, groups.

Index letters: c input channels, k kernel positions (product of kernel sizes), t output
positions (product of output sizes), G groups. A convolution is a weight applied at every
output position to an unfolded patch: with ``A`` (n, G, t, c/G·k) the patches and ``g``
(n, G, t, o/G) the output gradients, group γ's per-example piece is ``Σ_t g_γt A_γtᵀ``, the
sequence form of :mod:`._sequence`, with the groups folded into the example dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _sequence as seq
from ._registry import Call, Rule, register_rule


def _explicit_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Pad the input exactly as the convolution does, so that unfolding needs no padding."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    if module.padding == "same":
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    if module.padding == "valid":
        return x
    pads = []
    for p in reversed(module.padding):
        pads += [p, p]
    return F.pad(x, pads)


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of the input: (n, c, *spatial) -> (n, t, c·k), ordered like the weight's (c, *kernel)."""
    x = _explicit_padding(module, x)
    n, c = x.shape[:2]
    dims = len(module.kernel_size)
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        span = d * (k - 1) + 1
        # a new trailing axis of length span; then keep every d-th entry of it
        x = x.unfold(2 + axis, span, s)[..., ::d]
    # x: (n, c, *out, *kernel) -> (n, *out, c, *kernel)
    out_axes = list(range(2, 2 + dims))
    kernel_axes = list(range(2 + dims, 2 + 2 * dims))
    x = x.permute(0, *out_axes, 1, *kernel_axes)
    t = 1
    for size in x.shape[1 : 1 + dims]:
        t *= size
    return x.reshape(n, t, -1)


def _grouped(module: nn.modules.conv._ConvNd, calls: list[Call]) -> tuple[Tensor, Tensor, int]:
    """All calls as one sequence per (example, group): a (n·G, t, c/G·k), g (n·G, t, o/G), n."""
    groups = module.groups
    a_parts, g_parts = [], []
    for call in calls:
        a = unfold(module, call.args[0])  # (n, t, c·k)
        n, t, _ = a.shape
        a = a.reshape(n, t, groups, -1).transpose(1, 2).reshape(n * groups, t, -1)
        g = call.grad_outputs[0].reshape(n, groups, module.out_channels // groups, t)
        g = g.transpose(2, 3).reshape(n * groups, t, -1)
        a_parts.append(a)
        g_parts.append(g)
    a, g = (a_parts[0], g_parts[0]) if len(calls) == 1 else (torch.cat(a_parts, 1), torch.cat(g_parts, 1))
    return a, g, a.shape[0] // groups


@register_rule(nn.Conv3d)
@register_rule(nn.Conv2d)
@register_rule(nn.Conv1d)
class ConvRule(Rule):
    """Weight (o, c/G, *kernel): per group, ``Σ_t g_t A_tᵀ``; bias (o,): ``Σ_t g_t``."""

    def per_example_grads(self, module, calls):
        a, g, n = _grouped(module, calls)
        shape = (n, *module.weight.shape)
        return seq.weight_and_bias(
            module,
            lambda: seq.weight_grads(a, g).reshape(shape),
            lambda: seq.bias_grads(g).reshape(n, -1),
        )

    def sq_norms(self, module, calls):
        a, g, n = _grouped(module, calls)
        return seq.weight_and_bias(
            module,
            lambda: seq.weight_sq_norms(a, g).reshape(n, -1).sum(1),
            lambda: seq.bias_grads(g).reshape(n, -1).square().sum(1),
        )

    def second_moments(self, module, calls):
        a, g, n = _grouped(module, calls)
        return seq.weight_and_bias(
            module,
            lambda: seq.weight_grads(a, g).reshape(n, *module.weight.shape).square().sum(0),
            lambda: seq.bias_grads(g).reshape(n, -1).square().sum(0),
        )
