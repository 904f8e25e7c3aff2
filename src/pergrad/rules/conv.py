"""nn.Conv1d / Conv2d / Conv3d: stride, padding (numbers or "same"), padding modes, dilation, groups.

Index letters: c input channels, k kernel positions (product of kernel sizes), t output
positions (product of output sizes), G groups. A convolution is a weight applied at every
output position to an unfolded patch: with ``A`` (n, G, t, c/G·k) the patches and ``g``
(n, G, t, o/G) the output gradients, group γ's per-example piece is ``Σ_t g_γt A_γtᵀ``, the
sequence form of :mod:`._sequence`, with the groups folded into the example axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_rule
from ._sequence import Positions, WeightSharingRule


def _explicit_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Pad the input exactly as the convolution does, so that unfolding needs no padding."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    if module.padding == "valid":
        return x
    if module.padding == "same":
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for p in reversed(module.padding) for _ in (0, 1)]
    return F.pad(x, pads) if any(pads) else x


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of the input: (n, c, *spatial) -> (n, c·k, t), rows ordered like the weight's (c, *kernel)."""
    x = _explicit_padding(module, x)
    dims = len(module.kernel_size)
    if dims == 1:  # a 1-D signal is an image of height 1
        shape = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        return F.unfold(x.unsqueeze(2), shape[0], dilation=shape[1], stride=shape[2])
    if dims == 2:
        return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    n, c = x.shape[:2]
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        # a new trailing axis of length span; then keep every d-th entry of it
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]
    # x: (n, c, *out, *kernel) -> (n, c, *kernel, *out)
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return x.reshape(n, c * module.weight[0, 0].numel(), -1)


@register_rule(nn.Conv3d)
@register_rule(nn.Conv2d)
@register_rule(nn.Conv1d)
class ConvRule(WeightSharingRule):
    """Weight (o, c/G, *kernel): per group, ``Σ_t g_t A_tᵀ``; bias (o,): ``Σ_t g_t``."""

    def prepare(self, module, calls):
        groups = module.groups
        a_parts, g_parts = [], []
        for call in calls:
            a = unfold(module, call.args[0])  # (n, c·k, t)
            n, _, t = a.shape
            a_parts.append(a.reshape(n * groups, -1, t))  # (n·G, c/G·k, t): a view
            g_parts.append(call.grad_outputs[0].reshape(n * groups, -1, t))  # (n·G, o/G, t)
        a, g = (a_parts[0], g_parts[0]) if len(calls) == 1 else (torch.cat(a_parts, 2), torch.cat(g_parts, 2))
        return Positions(a.transpose(1, 2), g.transpose(1, 2), a.shape[0] // groups)
