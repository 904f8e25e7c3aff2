"""nn.Conv1d / Conv2d / Conv3d: stride, padding (numbers or "same"), padding modes, dilation, groups.

Index letters: c input channels, k kernel positions (product of kernel sizes), t output
positions (product of output sizes), G groups. A convolution is a weight applied at every
output position to an unfolded patch: with ``A`` (n, G, t, c/G·k) the patches and ``g``
(n, G, t, o/G) the output gradients, group γ's per-example piece is ``Σ_t g_γt A_γtᵀ``, the
sequence form of :mod:`._sequence`, with the groups folded into the example axis.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import flat_sq_norm, register_rule
from ._sequence import Positions, WeightSharingRule, gram_is_cheaper


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


class Pieces(NamedTuple):
    """Per-example gradients of a convolution, summed over its calls.

    Attributes:
        weight: (n, o, c/G, *kernel), or None when the weight is frozen.
        bias: (n, o), or None when there is no trainable bias.
    """

    weight: Tensor | None
    bias: Tensor | None


def _backward_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, list[int]]:
    """The input and the symmetric padding to pass to ``convolution_backward`` so that it
    sees what the forward did (explicit padding only where the forward padded unevenly or
    with a non-zero mode)."""
    dims = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return _explicit_padding(module, x), [0] * dims
    if module.padding == "valid":
        return x, [0] * dims
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(total % 2 for total in totals):
            return _explicit_padding(module, x), [0] * dims
        return x, [total // 2 for total in totals]
    return x, list(module.padding)


def per_example_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """(n, c, *in), (n, o, *out) -> (n, o, c/G, *kernel): ``Σ_t g_t A_tᵀ`` for every example.

    One weight-gradient convolution with the examples as extra groups: the batch becomes a
    single image of n·c channels, the output gradient one of n·o channels, and n·G groups keep
    each example's channels apart, so the weight gradient of that grouped convolution is the
    stack of the per-example ones. It runs torch's own convolution kernels, with no unfolded
    copy of the input. Where a patch (c/G·k values) is no bigger than a position's output
    gradient (o/G), as in a first layer on images, unfolding costs no more memory traffic
    than g itself, and one batched matmul of the patches with g is faster.
    """
    n, c = x.shape[:2]
    o = g.shape[1]
    groups = module.groups
    if module.weight[0].numel() <= o // groups:  # patches no bigger than g: unfold and multiply
        patches = unfold(module, x)  # (n, c·k, t)
        t = patches.shape[2]
        # (n·G, c/G·k, t) @ (n·G, t, o/G): the small output last runs faster than the transposed product
        pieces = torch.bmm(patches.reshape(n * groups, -1, t), g.reshape(n * groups, o // groups, t).transpose(1, 2))
        return pieces.transpose(1, 2).reshape(n, *module.weight.shape)
    x, padding = _backward_padding(module, x)
    stacked_weight = module.weight.detach().repeat(n, *[1] * (module.weight.dim() - 1))  # only its shape is read
    _, grads, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * o, *g.shape[2:]),
        x.reshape(1, n * c, *x.shape[2:]),
        stacked_weight,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * len(module.kernel_size),
        n * groups,
        [False, True, False],
    )
    return grads.view(n, *module.weight.shape)


@register_rule(nn.Conv3d)
@register_rule(nn.Conv2d)
@register_rule(nn.Conv1d)
class ConvRule(WeightSharingRule):
    """Weight (o, c/G, *kernel): per group, ``Σ_t g_t A_tᵀ``; bias (o,): ``Σ_t g_t``.

    Whichever form costs fewer multiply-adds for the layer's shapes: the per-example pieces
    materialised by :func:`per_example_weight_grads` (about t·(c/G·k)·(o/G) per example and
    group, summed over calls), or the Gram form of :mod:`._sequence` on unfolded patches
    (about t²·(c/G·k + o/G); cheaper only for few output positions and wide layers).
    """

    @staticmethod
    def _materialise(module, t: int) -> bool:
        """Whether materialising costs fewer multiply-adds than the Gram form, for t output positions."""
        return not gram_is_cheaper(t, module.weight[0].numel(), module.weight.shape[0] // module.groups)

    def prepare(self, module, calls):
        groups = module.groups
        if self._materialise(module, sum(call.grad_outputs[0][0, 0].numel() for call in calls)):
            return self._pieces(module, calls)
        a_parts, g_parts = [], []
        for call in calls:
            a = unfold(module, call.args[0])  # (n, c·k, t)
            n, _, t = a.shape
            a_parts.append(a.reshape(n * groups, -1, t))  # (n·G, c/G·k, t): a view
            g_parts.append(call.grad_outputs[0].reshape(n * groups, -1, t))  # (n·G, o/G, t)
        a, g = (a_parts[0], g_parts[0]) if len(calls) == 1 else (torch.cat(a_parts, 2), torch.cat(g_parts, 2))
        return Positions(a.transpose(1, 2), g.transpose(1, 2), a.shape[0] // groups)

    @staticmethod
    def _pieces(module, calls) -> Pieces:
        weight = bias = None
        if module.weight.requires_grad:
            weight = sum(per_example_weight_grads(module, c.args[0], c.grad_outputs[0]) for c in calls)
        if module.bias is not None and module.bias.requires_grad:
            bias = sum(c.grad_outputs[0].flatten(2).sum(2) for c in calls)
        return Pieces(weight, bias)

    def per_example_grads(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().per_example_grads(module, inputs)
        return {name: p for name, p in zip(("weight", "bias"), inputs) if p is not None}

    def sq_norms(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().sq_norms(module, inputs)
        return {name: flat_sq_norm(p) for name, p in zip(("weight", "bias"), inputs) if p is not None}

    def second_moments(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().second_moments(module, inputs)
        return {name: p.square().sum(0) for name, p in zip(("weight", "bias"), inputs) if p is not None}
