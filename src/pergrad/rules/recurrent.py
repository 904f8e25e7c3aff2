"""nn.RNN, nn.LSTM, nn.GRU, batch_first either way, through torch.func.

Their forward hands all the weights to one fused operation (``_VF.lstm``, ``_VF.gru``,
``_VF.rnn_tanh``/``rnn_relu``), inside which neither a hook nor the direct path's
operation-level mode sees them used (its per-example norms would be 0). The rule recomputes
each example's gradient with :class:`~.functional.FunctionalRule`: the module run on a batch
of one and differentiated by ``torch.func.vjp``, ``vmap``-ed over the examples.
It is exact for every configuration (layers, bidirectional, ``bias=False``, LSTM
``proj_size``, ``nonlinearity="relu"``), and costs about one more forward and backward of the
module.

The initial state is always passed explicitly, with its example axis: given by the caller, or
zeros as the module would make them. (Left to the module, its zeros have no example axis
under ``vmap``, and ATen's cells add the batched input gates into them in place, which vmap
refuses.)

Layouts, with D = 2 if bidirectional else 1, L layers: input (n, t, i) with ``batch_first``
else (t, n, i); hx (L·D, n, h), or for LSTM a pair (h0 (L·D, n, h_out), c0 (L·D, n, h));
outputs, flattened in order: output (n, t, D·h_out) or (t, n, D·h_out), h_n (L·D, n, h_out),
and for LSTM c_n (L·D, n, h). The example axis of hx, h_n and c_n is 1 either way.

The recomputation runs with oneDNN and cuDNN switched off, so that ATen's own cells compute it:
the fused kernels (oneDNN's LSTM, used on CPU in float32/bfloat16; cuDNN's RNNs) have no vmap
batching rule, and vmap's per-example fallback loses the workspace their backward needs.

Refused, with errors that say what to do: unbatched (2-D) input, ``PackedSequence`` input
(pad the batch and mask the loss instead), and inter-layer dropout in training mode (its random
masks cannot be reproduced).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import CaptureError
from ._registry import Call, register_rule
from .functional import Batched, FunctionalRule

_ARG_NAMES = ("input", "hx")


class _States(NamedTuple):
    """LSTM's (h0, c0), as a pytree vmap slices leaf by leaf, that can also regain its example
    axis (size 1) as one tensor does (``unsqueeze``, what :class:`FunctionalRule` calls)."""

    h: Tensor
    c: Tensor

    def unsqueeze(self, dim: int) -> _States:
        return _States(self.h.unsqueeze(dim), self.c.unsqueeze(dim))


def _arguments(call: Call) -> dict:
    """The call's arguments, all by keyword (``input``, ``hx``)."""
    kwargs = dict(call.kwargs)
    kwargs.update(zip(_ARG_NAMES, call.args, strict=False))
    return kwargs


def _batch_dim(module: nn.RNNBase) -> int:
    return 0 if module.batch_first else 1


def _input(module: nn.RNNBase, call: Call) -> Tensor:
    """The call's input sequence, checked to be a padded batch.

    Raises:
        CaptureError: a PackedSequence, or an input without an example axis.
    """
    x = _arguments(call).get("input")
    name = type(module).__name__
    if isinstance(x, PackedSequence):
        raise CaptureError(
            f"{name} was given a PackedSequence: its time steps are packed across examples, so "
            "pergrad cannot split them into examples. Pass a padded batch instead "
            "(torch.nn.utils.rnn.pad_sequence, or pad_packed_sequence on the packed one) and "
            "leave the padded positions out of each example's loss with a mask, e.g. "
            "losses = (token_loss * mask).sum(1) / mask.sum(1); take each example's final state "
            "from the output at its own length rather than from h_n, which is the state after "
            "the padding (a bidirectional layer's reverse direction also reads the padding)."
        )
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        layout = "(n, t, features) with batch_first=True" if module.batch_first else "(t, n, features)"
        raise CaptureError(
            f"{name} was called with an input of shape {shape}; per-example gradients need a "
            f"batch of examples: pass {layout}, with n = 1 for a single sequence."
        )
    return x


@contextmanager
def _unfused_kernels():
    """oneDNN and cuDNN off (their other settings untouched), restored on exit."""
    mkldnn, cudnn = torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)


class RecurrentRule(FunctionalRule):
    """nn.RNN / nn.LSTM / nn.GRU by torch.func (see the module doc)."""

    def check(self, module):
        if module.training and module.dropout > 0 and module.num_layers > 1:
            return (
                f"its dropout between layers (dropout={module.dropout}, in training mode) draws "
                "random masks that the per-example pass cannot reproduce; construct it with "
                "dropout=0.0 or call .eval() on it"
            )
        return None

    def example_axis(self, module):
        return _batch_dim(module)

    def batch_size(self, module, call):
        return _input(module, call).shape[_batch_dim(module)]

    def input_layout(self, module, call, n):
        # in the weights' dtype: the engine hands over float16/bfloat16 inputs widened to float32
        x = _input(module, call).to(module.weight_ih_l0.dtype)
        hx = _arguments(call).get("hx")
        if hx is None:  # the module's own zeros, with the example axis
            layers = module.num_layers * (2 if module.bidirectional else 1)
            h_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
            h0 = x.new_zeros(layers, n, h_out)
            hx = _States(h0, x.new_zeros(layers, n, module.hidden_size)) if isinstance(module, nn.LSTM) else h0
        elif isinstance(module, nn.LSTM):
            hx = _States(*(h.detach().to(x.dtype) for h in hx))
        else:
            hx = hx.detach().to(x.dtype)
        kwargs = {"input": x, "hx": hx}
        return (), kwargs, (), {"input": Batched(_batch_dim(module)), "hx": Batched(1)}

    def output_layout(self, module, call, index):
        # [output, h_n] or, for LSTM, [output, h_n, c_n]
        return Batched(_batch_dim(module) if index == 0 else 1)

    def records(self, module, calls):
        with _unfused_kernels():
            return super().records(module, calls)


RULE = RecurrentRule()
for _cls in (nn.RNN, nn.LSTM, nn.GRU):
    register_rule(_cls, RULE)
