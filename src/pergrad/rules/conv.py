"""nn.Conv1d / Conv2d / Conv3d: stride, padding (numbers or "same"), padding modes, dilation, groups.

Index letters: c input channels, k kernel positions (product of kernel sizes), t output
positions (product of output sizes), G groups. A convolution is a weight applied at every
output position to an unfolded patch: with ``A`` (n, G, t, c/G·k) the patches and ``g``
(n, G, t, o/G) the output gradients, group γ's per-example piece is ``Σ_t g_γt A_γtᵀ``, the
sequence form of :mod:`._sequence`, with the groups folded into the example axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Keep, Rule, register_rule
from ._sequence import gram_is_cheaper, row_sq_norms
from .linear import position_records

CHUNK_ELEMENTS = 1 << 19  # per-example pieces (or unfolded patches) built at once, at most (2 MiB in float32)


def _explicit_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Pad the input exactly as the convolution does, so that unfolding needs no padding."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    if module.padding == "valid":
        return x
    if module.padding == "same":
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for p in reversed(module.padding) for _ in (0, 1)]
    return F.pad(x, pads) if any(pads) else x


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of the input: (n, c, *spatial) -> (n, c·k, t), rows ordered like the weight's (c, *kernel).

    Strided views of the padded input, copied once by the final reshape (about twice as fast
    on CPU as ``F.unfold``'s im2col, and the same for 1, 2 and 3 spatial dims).
    """
    x = _explicit_padding(module, x)
    dims = len(module.kernel_size)
    n, c = x.shape[:2]
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation, strict=True)):
        # a new trailing axis of length span; then keep every d-th entry of it
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]
    # x: (n, c, *out, *kernel) -> (n, c, *kernel, *out)
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return x.reshape(n, c * module.weight[0, 0].numel(), -1)


def output_positions(module: nn.modules.conv._ConvNd, spatial: tuple[int, ...]) -> int:
    """t, the number of output positions of the convolution on an input of spatial size ``spatial``."""
    if module.padding == "same":
        return math.prod(spatial)
    padding = (0,) * len(spatial) if module.padding == "valid" else module.padding
    t = 1
    for size, k, s, d, p in zip(spatial, module.kernel_size, module.stride, module.dilation, padding, strict=True):
        t *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return t


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
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(total % 2 for total in totals):
            return _explicit_padding(module, x), [0] * dims
        return x, [total // 2 for total in totals]
    return x, list(module.padding)


def unfolds(module: nn.modules.conv._ConvNd) -> bool:
    """Whether :func:`per_example_weight_grads` unfolds the input rather than convolving: for
    patches of c/G·k values no bigger than a position's output gradient (o/G values), and for
    more than 64 input channels per group, where the grouped convolution slows down."""
    c_group = module.weight.shape[1]
    return module.weight[0].numel() <= module.weight.shape[0] // module.groups or c_group > 64


def per_example_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """(n, c, *in), (n, o, *out) -> (n, o, c/G, *kernel): ``Σ_t g_t A_tᵀ`` for every example.

    Two exact forms, chosen by :func:`unfolds`. One batched matmul of the unfolded patches
    with g: where a patch is no bigger than a position's output gradient, as in a first layer
    on images, the unfolded copy costs no more memory traffic than g itself. Otherwise one
    weight-gradient convolution with the examples as extra groups: the batch becomes a single
    image of n·c channels, the output gradient one of n·o channels, and n·G groups keep each
    example's channels apart, so the weight gradient of that grouped convolution is the stack
    of the per-example ones, with no unfolded copy of the input; mkldnn runs it well up to
    about 64 channels per group, and slower than the matmul beyond. Measured (CPU, float32,
    3×3 kernels, padding 1, the whole batch at once, ms, best of 10 to 40 on a shared machine):

    ====================  =======  ========  ===================  ===========================
    c→o, size, n          threads  unfolded  grouped convolution  the batch's weight gradient
    ====================  =======  ========  ===================  ===========================
    1→16, 28², 64         2        0.50      1.52                 1.43
    3→64, 32², 32         2        1.27      1.85                 1.21
    8→8, 28², 64          2        2.09      0.94                 0.67
    16→32, 14², 64        2        2.12      1.23                 1.10
    16→32, 14², 64        1        4.02      2.51                 2.44
    64→64, 14², 32        1        12.6      8.95                 7.88
    96→96, 14², 16        1        9.59      20.9                 8.37
    128→128, 14², 16      1        17.8      40.8                 15.2
    ====================  =======  ========  ===================  ===========================
    """
    n, c = x.shape[:2]
    o = g.shape[1]
    groups = module.groups
    if unfolds(module):
        patches = unfold(module, x)  # (n, c·k, t)
        t = patches.shape[2]
        # (n·G, c/G·k, t) @ (n·G, t, o/G): the small output last runs faster than the transposed product
        pieces = torch.bmm(patches.reshape(n * groups, -1, t), g.reshape(n * groups, o // groups, t).transpose(1, 2))
        return pieces.transpose(1, 2).reshape(n, *module.weight.shape)
    x, padding = _backward_padding(module, x)
    stacked_weight = module.weight.new_empty(n * o, *module.weight.shape[1:])  # only its shape is read: no copy
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


def chunk_size(module: nn.modules.conv._ConvNd, x: Tensor, t: int) -> int:
    """Examples whose pieces (and unfolded patches, where :func:`unfolds`) fit in CHUNK_ELEMENTS."""
    per_example = module.weight.numel()
    if unfolds(module):
        per_example = max(per_example, x.shape[1] * module.weight[0, 0].numel() * t)  # c·k·t patch values
    return max(1, CHUNK_ELEMENTS // per_example)


@register_rule(nn.Conv3d)
@register_rule(nn.Conv2d)
@register_rule(nn.Conv1d)
class ConvRule(Rule):
    """Weight (o, c/G, *kernel): per group, ``Σ_t g_t A_tᵀ``; bias (o,): ``Σ_t g_t``.

    Whichever form costs fewer multiply-adds for the layer's shapes: the per-example pieces
    of :func:`per_example_weight_grads` (about t·(c/G·k)·(o/G) per example and group, summed
    over calls), or the Gram form of :mod:`._sequence` on unfolded patches (about
    t²·(c/G·k + o/G); cheaper only for few output positions and wide layers).

    Where the pieces are materialised, they are built during the backward pass and the batch
    weight gradient is their sum, which autograd then does not compute a second time (the
    weight-gradient convolution of a plain step, which costs about as much as the pieces).
    They are built in chunks of examples (:func:`chunk_size`) reduced at once to squared norms
    (and second moments when asked for), so that no (n, o, c/G, *kernel) tensor outlives a
    chunk unless the per-example gradients themselves are needed. The bias's gradient is built
    there in every form (``Σ_t g_t`` per example, then summed): mkldnn's convolution_backward
    asked for the bias's gradient alone computes the weight's anyway, at the same cost, so
    autograd is left with the input's gradient only.
    """

    @staticmethod
    def _materialise(module, t: int) -> bool:
        """Whether materialising costs fewer multiply-adds than the Gram form, for t output positions."""
        return not gram_is_cheaper(t, module.weight[0].numel(), module.weight.shape[0] // module.groups)

    def grads_in_backward(self, module, args, keep):
        x = args[0] if args else None  # an input passed by keyword: leave the parameters to autograd
        if not isinstance(x, Tensor) or x.dim() != len(module.kernel_size) + 2:
            return ()  # an unbatched input
        return self._built_in_backward(module, x)

    def _built_in_backward(self, module, x: Tensor) -> tuple[str, ...]:
        """What the backward builds for a batched input ``x``: the bias always, the weight where
        its pieces are materialised."""
        bias = ("bias",) if module.bias is not None else ()
        return ("weight", *bias) if self._materialise(module, output_positions(module, tuple(x.shape[2:]))) else bias

    def backward_call(self, module, call, grad_output, keep: Keep):
        x, g = call.args[0], grad_output
        built = self._built_in_backward(module, x)
        grads = {}
        if "bias" in built and module.bias.requires_grad:
            call.pieces["bias"] = g.flatten(2).sum(2)  # (n, o)
            grads["bias"] = call.pieces["bias"].sum(0)
        if "weight" not in built or not module.weight.requires_grad:
            return grads
        n = x.shape[0]
        grad = x.new_zeros(module.weight.numel())
        whole = x.new_empty(n, *module.weight.shape) if keep.grads else None  # else only their reductions
        sq = None if keep.grads else x.new_empty(n)
        second = x.new_zeros(module.weight.numel()) if keep.second and not keep.grads else None
        chunk = chunk_size(module, x, g[0, 0].numel())
        for start in range(0, n, chunk):
            end = start + chunk
            pieces = per_example_weight_grads(module, x[start:end], g[start:end])  # (chunk, o, c/G, *kernel)
            if whole is not None:
                whole[start:end] = pieces
            pieces = pieces.flatten(1)
            grad += pieces.sum(0)
            if sq is not None:
                sq[start:end] = row_sq_norms(pieces)
            if second is not None:
                second += pieces.square().sum(0)
        if whole is not None:
            call.pieces["weight"] = whole
        else:
            call.pieces["weight_sq"] = sq
        if second is not None:
            call.pieces["weight_second"] = second.view(module.weight.shape)
        return grads | {"weight": grad.view(module.weight.shape)}

    def records(self, module, calls):
        """Per call: the weight's pieces where the backward built them (or what it kept of them)
        or where materialising is cheaper, else an :class:`Outer` record of the unfolded input;
        the bias's pieces ``Σ_t g_jt``."""
        groups, out = module.groups, {}
        for call in calls:
            x, g = call.args[0], call.grad_outputs[0]  # (n, c, *spatial), (n, o, *spatial')
            n, t = x.shape[0], g[0, 0].numel()
            built = dict(call.pieces)
            weight_known = "weight" in built or "weight_sq" in built or not module.weight.requires_grad
            if not weight_known and self._materialise(module, t):
                built["weight"] = per_example_weight_grads(module, x, g)
                weight_known = True
            a = None if weight_known else unfold(module, x).reshape(n * groups, -1, t).transpose(1, 2)
            g = g.reshape(n * groups, -1, t).transpose(1, 2)  # (n·G, t, o/G)
            for name, record in position_records(module, a, g, n, built).items():
                out.setdefault(name, []).append(record)
        return out
