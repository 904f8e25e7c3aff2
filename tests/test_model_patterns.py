"""The patterns behind real models' failures, each as a small model of its own, float64, against
the torch.func reference (tests/reference.py); and the verification that turns a wrong rule into
an error instead of a wrong number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pergrad
from pergrad.rules import Dense, Rule

from reference import per_example_loss, reference_grads

N, T, D = 5, 4, 6


def _check(model, x, on_unsupported="auto", tol=1e-10, same_math=None):
    """PerExample (gradients and norms modes) against the reference (on ``same_math``, the same
    model without checkpointing, where given); returns the paths."""
    target = torch.randn(model(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = reference_grads(same_math or model, x, target)
    with pergrad.PerExample(model, grads=True, on_unsupported=on_unsupported) as pe:
        grads = pe.backward(per_example_loss(model(x), target)).grads
    with pergrad.PerExample(model, second_moment=True, on_unsupported=on_unsupported) as pe:
        cheap = pe.backward(per_example_loss(model(x), target))
    scale = max(w.abs().max() for w in want.values())
    for name, w in want.items():
        assert (grads[name] - w).abs().max() <= tol * scale, name
        sq = w.reshape(len(x), -1).square().sum(1)
        assert (cheap.param_sq_norms[name] - sq).abs().max() <= tol * scale**2 * w[0].numel(), name
        assert (cheap.second_moment[name] - w.square().sum(0)).abs().max() <= tol * scale**2 * len(x), name
    return pe.paths


class PositionIds(nn.Module):
    """Token embeddings plus position embeddings looked up with ids of shape (1, t)."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions, self.head = nn.Embedding(10, D), nn.Embedding(T, D), nn.Linear(D, 2)

    def forward(self, ids):
        position_ids = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, t): broadcast over the batch
        return self.head(torch.tanh(self.tokens(ids) + self.positions(position_ids)))


class RelativeBias(nn.Module):
    """Attention scores plus a learned bias table indexed by a (t, t) buffer, broadcast from (1, t, t)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn(2 * T - 1))
        self.register_buffer("index", torch.arange(T)[:, None] - torch.arange(T)[None, :] + T - 1)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2)  # (n, t, t)
        bias = self.table[self.index].unsqueeze(0)  # (1, t, t)
        return torch.softmax(scores + bias, -1) @ x


class TokensOnTheModel(nn.Module):
    """A class token, a position table and a layer scale living on the model itself (timm's ViT)."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, T + 1, D))
        self.gamma = nn.Parameter(torch.randn(D))
        self.mask_token = nn.Parameter(torch.randn(D))
        self.mix = nn.Linear(D, D)

    def forward(self, x):
        masked = x[..., :1] > 1.0  # (n, t, 1): replace some positions by the mask token
        x = torch.where(masked, self.mask_token, x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return x + self.gamma * torch.tanh(self.mix(x))


class ScaledLinear(nn.Linear):
    """Looks like nn.Linear, computes something else: the subclass trap."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm subclass that permutes channels last and back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMSNormLike(nn.Module):
    """Llama's RMSNorm: computed in the module's own forward, weight applied directly."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Flattened(nn.Module):
    """OPT's decoder: examples and positions flattened together before the feed-forward layers."""

    def __init__(self, examples_first=True):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(D, 8), nn.Linear(8, D), nn.LayerNorm(D)
        self.examples_first = examples_first

    def forward(self, x):
        n, t, d = x.shape
        h = x.reshape(n * t, d) if self.examples_first else x.transpose(0, 1).reshape(t * n, d)
        h = self.fc2(torch.relu(self.fc1(self.norm(h))))
        return h.reshape(n, t, d) if self.examples_first else h.reshape(t, n, d).transpose(0, 1)


class OwnConv(nn.Module):
    """A convolution with the module's own weight: no direct form, so torch.func for this module."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 3))

    def forward(self, x):
        return F.conv1d(x, self.weight, padding=1)


def _seq(n=N):
    return torch.randn(n, T, D, dtype=torch.float64)


def test_position_ids_made_inside_the_model_have_no_example_axis():
    """ids (1, t) from ``arange``: the lookup has no examples; its rows get them where they meet
    the batch (broadcasting in ``+``)."""
    paths = _check(PositionIds().double(), torch.randint(0, 10, (N, T)))
    assert paths["positions"] == "rule EmbeddingRule; direct (add, embedding) for calls without an example axis"


def test_a_long_position_table_is_never_materialised_per_example(monkeypatch):
    """GPT-2's 1024 positions looked up for t = 4: the rows each example used, not (n, 1024, d)."""
    from memory import LargestTensor

    from pergrad.rules import _sequence

    monkeypatch.setattr(_sequence, "FORM", "gram")  # no timing of the Linear's forms (its buffer is not the point)
    model = PositionIds().double()
    model.positions = nn.Embedding(1024, D).double()
    ids = torch.randint(0, 10, (N, T))
    with pergrad.PerExample(model, verify=False) as pe, LargestTensor() as probe:
        pe.backward(per_example_loss(model(ids), torch.zeros(N, T, 2, dtype=torch.float64)))
    assert probe.largest < N * 1024 * D / 4


def test_relative_bias_table_indexed_by_a_buffer():
    paths = _check(RelativeBias().double(), _seq())
    assert paths["<model>"] == "direct (add)"


def test_class_token_position_table_layer_scale_and_mask_token_on_the_model_itself():
    paths = _check(TokensOnTheModel().double(), _seq() * 2)
    assert paths["<model>"] == "direct (add, cat, mul, where)"


def test_a_subclass_that_overrides_forward_gets_no_inherited_rule_and_is_right():
    model = nn.Sequential(ScaledLinear(D, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    paths = _check(model, _seq())
    assert paths["0"] == "direct (linear)"
    assert paths["2"] == "rule LinearRule"


def test_layer_norm_subclass_that_permutes():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), LayerNorm2d(4), nn.Conv2d(4, 2, 1)).double()
    paths = _check(model, torch.randn(N, 2, 5, 5, dtype=torch.float64))
    assert paths["1"] == "direct (layer_norm)"


def test_rms_norm_written_in_the_module():
    model = nn.Sequential(nn.Linear(D, D), RMSNormLike()).double()
    assert _check(model, _seq())["1"] == "direct (mul)"


def test_examples_and_positions_flattened_together():
    _check(Flattened().double(), _seq())


@pytest.mark.parametrize("n", [N, T, 2 * T], ids=["n-not-t", "n-equals-t", "n-multiple-of-t"])
def test_positions_first_flattening_is_followed(n):
    """(n, t, d) transposed to (t, n, d) and flattened to (t·n, d): every row's example is known."""
    paths = _check(Flattened(examples_first=False).double(), _seq(n))
    assert paths["fc1"] == "rule LinearRule"


def test_an_operation_without_a_direct_form_goes_through_torch_func_and_says_so():
    model = nn.Sequential(OwnConv(), nn.Tanh()).double()
    paths = _check(model, torch.randn(N, 2, 7, dtype=torch.float64))
    assert paths["0"] == "torch.func (conv1d on ['weight'])"


class Table(nn.Module):
    """A module that returns a table computed from its parameter alone: (t, d), or (1, t, d)."""

    def __init__(self, leading_one: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(T, D))
        self.leading_one = leading_one

    def forward(self, t: int):
        table = self.weight[:t]
        return table[None] if self.leading_one else table


class UsesTable(nn.Module):
    """The parent adds the table to the batch (or, in ``einsum`` mode, contracts with it)."""

    def __init__(self, leading_one=False, einsum=False):
        super().__init__()
        self.table, self.out, self.einsum = Table(leading_one), nn.Linear(D, 2), einsum

    def forward(self, x):
        table = self.table(x.shape[1])
        if self.einsum:
            return torch.einsum("ntd,td->nt", x, table)
        return self.out(torch.tanh(x + table))


@pytest.mark.parametrize("leading_one", [False, True])
def test_a_table_returned_by_a_module_and_broadcast_in_its_parent(leading_one):
    assert _check(UsesTable(leading_one).double(), _seq())["table"] == "direct (add)"


def test_a_table_that_meets_the_batch_in_an_operation_without_a_direct_form_is_a_clear_error():
    model = UsesTable(einsum=True).double()
    with pergrad.PerExample(model) as pe:
        with pytest.raises(pergrad.CaptureError, match="Table at 'table' returns a tensor used by einsum"):
            pe.backward(per_example_loss(model(_seq()), 0))


class Windows(nn.Module):
    """Swin: each example's positions split into windows stacked along the batch axis (n·w, t, d),
    attention in each window with a learned relative bias (1, heads, t, t) from a module of its own."""

    def __init__(self, heads=2, window=2):
        super().__init__()
        self.qkv, self.heads, self.window = nn.Linear(D, 3 * D), heads, window

        class Bias(nn.Module):
            def __init__(self):
                super().__init__()
                self.table = nn.Parameter(torch.randn(2 * window - 1, heads))
                self.register_buffer("index", (torch.arange(window)[:, None] - torch.arange(window)[None, :] + window - 1))

            def forward(self):
                return self.table[self.index].permute(2, 0, 1).unsqueeze(0)  # (1, heads, t, t)

        self.bias = Bias()

    def forward(self, x):
        n, t, d = x.shape
        w = x.reshape(n * (t // self.window), self.window, d)  # windows join the batch axis
        q, k, v = self.qkv(w).reshape(w.shape[0], self.window, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias())
        return out.transpose(1, 2).reshape(n, t, d)


def test_windows_stacked_along_the_batch_with_a_relative_bias():
    assert _check(Windows().double(), _seq())["bias"] == "direct (scaled_dot_product_attention)"


class TransposedWeight(nn.Linear):
    """Falcon's FalconLinear: ``input @ self.weight.T``."""

    def forward(self, x):
        return x @ self.weight.T


class InPlaceResidual(nn.Module):
    """Module outputs modified in place afterwards (Falcon: ``mlp_output += attention_output``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.direct = nn.Linear(D, D), TransposedWeight(D, D, bias=False)

    def forward(self, x):
        h = self.fc(x)
        h += x
        out = self.direct(torch.tanh(h))
        out += h
        return out


def test_module_outputs_modified_in_place_afterwards():
    paths = _check(InPlaceResidual().double(), _seq())
    assert paths == {"fc": "rule LinearRule", "direct": "direct (matmul)"}


def test_outputs_modified_in_place_after_gradients_built_in_the_backward(monkeypatch):
    """The same, where the Linear's input requires a gradient and its pieces are built in the
    backward: its gradients come back through its input, so its output may be modified in place."""
    from pergrad.rules import _sequence

    monkeypatch.setattr(_sequence, "FORM", "materialise")  # build the pieces in the backward in norms mode too
    model = nn.Sequential(nn.Linear(D, D), InPlaceResidual()).double()
    paths = _check(model, _seq())
    assert paths["0"] == paths["1.fc"] == "rule LinearRule"


@pytest.mark.parametrize("form", ["materialise", "gram"], ids=["built-in-backward", "gram"])
def test_in_place_on_a_linear_sequence_output_in_norms_mode(form, monkeypatch):
    """Norms mode, either form: the in-place add on F.linear's (n, t, o) output (a view of its
    (n·t, o) product) routes the gradient around the view's node; the hooks still get it."""
    from pergrad.rules import _sequence

    monkeypatch.setattr(_sequence, "FORM", form)
    model = nn.Sequential(nn.Linear(D, D), InPlaceResidual()).double()
    x = _seq()
    target = torch.randn(model(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = reference_grads(model, x, target)
    with pergrad.PerExample(model, verify=False) as pe:
        got = pe.backward(per_example_loss(model(x), target)).param_sq_norms
    for name, w in want.items():
        torch.testing.assert_close(got[name], w.reshape(len(x), -1).square().sum(1), rtol=1e-10, atol=0)


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.w


class WrongRule(Rule):
    """Half of every piece: what a rule that misreads its module would give."""

    def records(self, module, calls):
        return {"w": [Dense(0.5 * (c.grad_outputs[0] * c.args[0]).reshape(c.args[0].shape[0], -1, D).sum(1)) for c in calls]}


def test_the_first_backward_turns_a_wrong_rule_into_an_error(monkeypatch):
    from pergrad.rules import _registry

    monkeypatch.setitem(_registry._RULES, Doubler, WrongRule())  # registered for this test only
    model = nn.Sequential(nn.Linear(D, D), Doubler()).double()
    x = _seq()
    with pergrad.PerExample(model) as pe:
        with pytest.raises(pergrad.VerificationError, match=r"'1.w' \(Doubler at '1', rule WrongRule\)"):
            pe.backward(per_example_loss(model(x), 0))
    with pergrad.PerExample(model, verify=False) as pe:  # its pieces do not add up to .grad: refused anyway
        with pytest.raises(pergrad.VerificationError, match=r"'1.w' .* do not add up to autograd's gradient"):
            pe.backward(per_example_loss(model(x), 0))
    with pergrad.PerExample(model, verify=True) as pe:  # checked on every backward, not only the first
        with pytest.raises(pergrad.VerificationError):
            pe.backward(per_example_loss(model(x), 0))


class SwappingRule(Rule):
    """Pieces that add up to the batch gradient but belong to the wrong examples (rolled by one):
    only the first-backward check against single examples can see this."""

    def records(self, module, calls):
        return {"w": [Dense((c.grad_outputs[0] * c.args[0]).reshape(c.args[0].shape[0], -1, D).sum(1).roll(1, 0)) for c in calls]}


def test_pieces_that_add_up_but_misattribute_examples_are_caught_by_the_first_backward(monkeypatch):
    from pergrad.rules import _registry

    monkeypatch.setitem(_registry._RULES, Doubler, SwappingRule())
    model = nn.Sequential(nn.Linear(D, D), Doubler()).double()
    x = _seq()
    with pergrad.PerExample(model) as pe:
        with pytest.raises(pergrad.VerificationError, match=r"'1.w' \(Doubler at '1', rule SwappingRule\) is wrong"):
            pe.backward(per_example_loss(model(x), 0))
    with pergrad.PerExample(model, verify=False) as pe:  # unchecked: the wrong number, as asked
        pe.backward(per_example_loss(model(x), 0))


def test_verify_setting_is_checked():
    with pytest.raises(ValueError, match="verify"):
        pergrad.PerExample(nn.Linear(2, 2), verify="always")


def test_verification_leaves_grad_as_autograd_does():
    model = TokensOnTheModel().double()
    x = _seq()
    plain = TokensOnTheModel().double()
    plain.load_state_dict(model.state_dict())
    per_example_loss(plain(x), 0).mean().backward()
    with pergrad.PerExample(model) as pe:
        pe.backward(per_example_loss(model(x), 0))
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=0), name


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm, self.ff, self.scale = nn.LayerNorm(D), nn.Linear(D, D), nn.Parameter(torch.full((D,), 0.5))

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.scale * self.ff(self.norm(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_results_within_that_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D), _Block()).float()
    x = torch.randn(N, T, D)
    target = torch.randn(N, T, D)

    def losses():
        with torch.autocast("cpu", dtype=dtype):
            return per_example_loss(model(x).float(), target)

    want = []
    for j in range(N):  # autograd, one example at a time, under the same autocast
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            per_example_loss(model(x[j : j + 1]).float(), target[j : j + 1])[0].backward()
        want.append(sum(p.grad.double().square().sum() for p in model.parameters()))
    want = torch.stack(want)
    model.zero_grad()
    with pergrad.PerExample(model) as pe:
        result = pe.backward(losses())
    assert result.sq_norms.dtype == torch.float32
    assert ((result.sq_norms.double() - want).abs() / want).max() < 0.05


def test_grad_scaler_gives_unscaled_results_and_scaled_grads():
    model = TokensOnTheModel().double()
    x = _seq()
    with pergrad.PerExample(model) as pe:
        plain = pe.backward(per_example_loss(model(x), 0))
    unscaled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pergrad.PerExample(model) as pe:
        scaled = pe.backward(per_example_loss(model(x), 0), scaler=scaler)
    assert torch.allclose(scaled.sq_norms, plain.sq_norms, rtol=1e-12, atol=0)
    assert torch.allclose(scaled.batch_grad_sq_norm, plain.batch_grad_sq_norm, rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), unscaled):
        assert torch.allclose(p.grad, 1024.0 * g, rtol=1e-12, atol=0)


def test_frozen_parameters_are_left_out_and_the_rest_is_right():
    model = TokensOnTheModel().double()
    model.cls_token.requires_grad_(False)
    model.mix.weight.requires_grad_(False)
    _check(model, _seq() * 2)
    with pergrad.PerExample(model) as pe:
        result = pe.backward(per_example_loss(model(_seq()), 0))
    assert "cls_token" not in result.param_sq_norms and "mix.weight" not in result.param_sq_norms


class Checkpointed(nn.Module):
    """A first layer, then a checkpointed block (as transformers checkpoint their layers)."""

    def __init__(self, reentrant: bool, use_checkpoint: bool = True):
        super().__init__()
        self.first, self.inner = nn.Linear(D, D), TokensOnTheModel()
        self.reentrant, self.use_checkpoint = reentrant, use_checkpoint

    def forward(self, x):
        h = self.first(x)
        return checkpoint(self.inner, h, use_reentrant=self.reentrant) if self.use_checkpoint else self.inner(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    model = Checkpointed(reentrant).double()
    plain = Checkpointed(reentrant, use_checkpoint=False).double()  # torch.func cannot run checkpoints
    plain.load_state_dict(model.state_dict())
    _check(model, _seq() * 2, same_math=plain)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # dynamo's own probing
def test_compiled_model_is_right():
    model = TokensOnTheModel().double()
    compiled = torch.compile(model, backend="aot_eager")
    x = _seq() * 2
    target = torch.zeros(N, T + 1, D, dtype=torch.float64)
    want = reference_grads(model, x, target)
    with pergrad.PerExample(model) as pe:
        result = pe.backward(per_example_loss(compiled(x), target))
    for name, w in want.items():
        assert torch.allclose(result.param_sq_norms[name], w.reshape(N, -1).square().sum(1), rtol=1e-10, atol=0), name
