"""The single-example check where frameworks own the backward (both callbacks), and once per model.

A rule whose pieces are rolled across examples adds up to the batch gradient (the sums check
cannot see it) but gives every example its neighbour's gradient: only the check against
autograd on single examples catches it. Inside a real ``lightning.Trainer`` fit and a real
``transformers.Trainer`` run it must stop training with ``VerificationError`` before any
pergrad metric is logged; the right rule must pass; and re-attaching ``PerExample`` to a model
already verified must not check again, unless the model or the settings changed.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers as T_
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

import pergrad
from pergrad.integrations.lightning import PergradCallback as LightningCallback
from pergrad.integrations.transformers import PergradCallback as HFCallback
from pergrad.per_example import PerExample
from pergrad.rules import Rule, _registry
from pergrad.rules.records import Dense
from pergrad.verify import Schedule, example_of, worst_mismatch

from lightning_worker import C, D, Classifier, fit
from test_integration_transformers import _dataset, _model


class RolledRule(Rule):
    """The pieces of a Linear (weight (o, i)) or GPT-2 Conv1D (weight (i, o)), given to the wrong
    examples: example j gets example j−1's. They still add up to the batch gradient."""

    def records(self, module, calls):
        out = {"weight": [], "bias": []}
        for c in calls:
            a, g = c.args[0], c.grad_outputs[0]
            a, g = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])  # (n, t, i), (n, t, o)
            spec = "nti,nto->nio" if isinstance(module, Conv1D) else "nti,nto->noi"
            out["weight"].append(Dense(torch.einsum(spec, a, g).roll(1, 0)))
            out["bias"].append(Dense(g.sum(1).roll(1, 0)))
        return out


class RolledLinear(nn.Linear):
    """An nn.Linear subclass (its forward kept) registered with the wrong rule."""


class Counted:
    """Wraps a method of PerExample, counting its calls."""

    def __init__(self, monkeypatch, name: str):
        self.calls = 0
        original = getattr(PerExample, name)

        def counted(pe, *args, **kwargs):
            self.calls += 1
            return original(pe, *args, **kwargs)

        monkeypatch.setattr(PerExample, name, counted)


# --- Lightning -----------------------------------------------------------------------------


def _classifier(rolled: bool) -> Classifier:
    module = Classifier(accumulate=2)
    if rolled:
        first = RolledLinear(D, 8)
        first.load_state_dict(module.net[0].state_dict())
        module.net[0] = first
    return module


def test_a_wrong_rule_inside_a_lightning_fit_stops_it_before_any_metric(tmp_path, monkeypatch):
    monkeypatch.setitem(_registry._RULES, RolledLinear, RolledRule())
    module = _classifier(rolled=True)
    with pytest.raises(pergrad.VerificationError, match=r"'net.0.(weight|bias)' \(RolledLinear at 'net.0', rule RolledRule\) is wrong"):
        fit(tmp_path, accumulate=2, module=module)
    assert not (tmp_path / "run" / "metrics.csv").exists()
    # nothing logged: the fit stopped in the first step's on_before_optimizer_step
    assert module.trainer.global_step == 0
    assert not any(k.startswith("pergrad/") for k in module.trainer.callback_metrics)
    assert all(m.training for m in module.modules())  # the modes the check switched, restored
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in module.parameters())


def test_the_same_wrong_rule_is_logged_unchecked_with_verify_false(tmp_path, monkeypatch):
    monkeypatch.setitem(_registry._RULES, RolledLinear, RolledRule())
    module, callback, trainer = fit(tmp_path, accumulate=2, module=_classifier(rolled=True), verify=False)
    assert "pergrad/b_simple" in trainer.callback_metrics  # the wrong numbers, as asked


def test_the_right_rule_passes_the_lightning_check_on_the_first_step_only(tmp_path, monkeypatch):
    checked = Counted(monkeypatch, "check_result")
    module, callback, trainer = fit(tmp_path, accumulate=2)
    assert checked.calls == 1 and callback.statistics.steps == 4
    assert "pergrad/b_simple" in trainer.callback_metrics
    assert len(module.seen) == 8  # training_step's own side effects are the test's business, not the check's


def test_periodic_lightning_check_every_two_steps(tmp_path, monkeypatch):
    checked = Counted(monkeypatch, "check_result")
    fit(tmp_path, accumulate=1, verify=2)  # 8 steps: the first, then steps 2, 4, 6
    assert checked.calls == 4


class Dropped(Classifier):
    """Dropout between the layers: the checked step must run without it."""

    def __init__(self):
        super().__init__(accumulate=1)
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, C))


def test_dropout_is_off_on_the_checked_step_only(tmp_path):
    module, callback, trainer = fit(tmp_path, module=Dropped())
    assert callback.statistics.steps == 8 and module.net[2].training


class PairBatch(Classifier):
    """A batch that carries a tensor without the examples' axis."""

    def on_train_batch_start(self, batch, batch_idx):
        pass

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)


def test_a_batch_tensor_without_the_example_axis_names_verify_false(tmp_path):
    module = PairBatch(accumulate=1)
    g = torch.Generator().manual_seed(0)
    data = [(x, y, torch.zeros(3)) for x, y in zip(torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g))]
    loader = DataLoader(data, batch_size=4, collate_fn=lambda rows: (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), rows[0][2]))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", precision="64-true", callbacks=[LightningCallback()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"shape \(3,\), not 4 examples.*verify=False"):
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, loader)


# --- Hugging Face ----------------------------------------------------------------------------


def _trainer(tmp_path, **options):
    args = T_.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.05, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = T_.Trainer(model=_model(), args=args, train_dataset=_dataset(), data_collator=collate)
    return trainer, HFCallback.attach(trainer, run_dir=tmp_path / "run", **options)


def test_a_wrong_rule_inside_a_transformers_trainer_stops_it_before_any_metric(tmp_path, monkeypatch):
    monkeypatch.setitem(_registry._RULES, Conv1D, RolledRule())
    trainer, callback = _trainer(tmp_path)
    with pytest.raises(pergrad.VerificationError, match=r"\(Conv1D at 'transformer.h.0.*rule RolledRule\) is wrong"):
        trainer.train()
    assert callback.statistics.steps == 0
    assert not any(k.startswith("pergrad/") for h in trainer.state.log_history for k in h)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_the_right_rule_passes_the_transformers_check(tmp_path, monkeypatch):
    checked = Counted(monkeypatch, "check_result")
    trainer, callback = _trainer(tmp_path)
    trainer.train()
    assert checked.calls == 1 and callback.statistics.steps == 2
    assert any("pergrad/b_simple" in h for h in trainer.state.log_history)


# --- once per model --------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _step(model, **options):
    x = torch.randn(5, 4, dtype=torch.float64)
    with PerExample(model, **options) as pe:
        return pe.backward(model(x).square().sum(1))


def test_reattaching_to_a_verified_model_does_not_check_again(monkeypatch):
    checked = Counted(monkeypatch, "_check_against_autograd")
    model = _mlp()
    for _ in range(3):
        _step(model)
    assert checked.calls == 1
    _step(_mlp())  # another model object: checked
    assert checked.calls == 2


@pytest.mark.parametrize(
    "change",
    ["replace a layer", "another layer type", "freeze a parameter", "grow a layer", "second_moment", "grads",
     "on_unsupported", "another rule"],
)  # fmt: skip
def test_a_changed_model_or_settings_is_checked_again(change, monkeypatch):
    checked = Counted(monkeypatch, "_check_against_autograd")
    model = _mlp()
    _step(model)
    options = {}
    if change == "replace a layer":
        model[2] = nn.Linear(6, 3).double()
    elif change == "another layer type":
        model[1] = nn.ReLU()
    elif change == "freeze a parameter":
        model[0].bias.requires_grad_(False)
    elif change == "grow a layer":
        model[2] = nn.Linear(6, 5).double()
    elif change == "another rule":
        monkeypatch.setitem(_registry._RULES, nn.Linear, RolledRule())
    else:
        options = {change: "fallback" if change == "on_unsupported" else True}
    if change == "another rule":
        with pytest.raises(pergrad.VerificationError, match="RolledRule"):
            _step(model)
    else:
        _step(model, **options)
    assert checked.calls == 2
    if change != "another rule":
        _step(model, **options)  # now verified as it is
        assert checked.calls == 2


def test_a_model_that_failed_the_check_is_checked_again(monkeypatch):
    monkeypatch.setitem(_registry._RULES, RolledLinear, RolledRule())
    model = nn.Sequential(RolledLinear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for _ in range(2):
        with pytest.raises(pergrad.VerificationError, match="RolledRule"):
            _step(model)


def test_the_sums_check_runs_once_per_model_not_once_per_attachment(monkeypatch):
    summed = Counted(monkeypatch, "_check_pieces_add_up")
    model = _mlp()
    for _ in range(5):
        _step(model, verify=False)
    assert summed.calls == 1


def test_periodic_verify_checks_one_example_every_k_backwards(monkeypatch):
    seen = []
    original = PerExample._check_against_autograd

    def spy(pe, losses, result, low_precision, examples):
        seen.append(list(examples))
        return original(pe, losses, result, low_precision, examples)

    monkeypatch.setattr(PerExample, "_check_against_autograd", spy)
    model = _mlp()
    for _ in range(7):
        _step(model, verify=3)
    assert seen == [[0, 4], [1], [2]]  # the first backward, then backwards 3 and 6: one example each


def test_verify_settings_are_checked():
    with pytest.raises(ValueError, match="verify"):
        PerExample(_mlp(), verify=0)
    with pytest.raises(ValueError, match="verify"):
        Schedule("always")


def test_the_comparison_up_to_a_factor_still_sees_a_wrong_share():
    want = {"a": 1.0, "b": 3.0}
    assert worst_mismatch({"a": 2.0, "b": 6.0}, want, 1e-5, up_to_factor=True) is None
    assert worst_mismatch({"a": 2.0, "b": 6.0}, want, 1e-5) is not None
    assert worst_mismatch({"a": 3.0, "b": 1.0}, want, 1e-5, up_to_factor=True)[0] == "a"
    three, got = {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.1, "b": 1.0, "c": 4.0}
    assert worst_mismatch(got, three, 1e-5)[0] == "a"  # exact: the first
    assert worst_mismatch(got, three, 1e-5, up_to_factor=True)[0] == "b"  # fitted (c = 6.1/3): the worst
    assert worst_mismatch({"a": 0.0, "b": 0.0}, want, 1e-5, up_to_factor=True) is not None


def test_example_of_slices_every_tensor_of_a_nested_batch():
    batch = {"x": torch.arange(6).reshape(3, 2), "parts": [torch.arange(3), "text", None], "k": 7}
    one = example_of(batch, 2, 3)
    assert one["x"].tolist() == [[4, 5]] and one["parts"][0].tolist() == [2] and one["parts"][1:] == ["text", None]
    assert one["k"] == 7


class HalvedRule(RolledRule):
    """Half of every piece, in the right examples: the pieces no longer add up."""

    def records(self, module, calls):
        rolled = super().records(module, calls)
        return {k: [Dense(0.5 * r.pieces.roll(-1, 0)) for r in recs] for k, recs in rolled.items()}


def test_watched_sums_of_a_framework_backward_catch_pieces_that_do_not_add_up(monkeypatch):
    monkeypatch.setitem(_registry._RULES, RolledLinear, HalvedRule())
    model = nn.Sequential(RolledLinear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with PerExample(model, verify=False) as pe:
        for watch in (False, True):
            model.zero_grad(set_to_none=True)
            pe.watch_sums(watch)
            for xs in x.chunk(2):  # two micro-batches, as a framework accumulates
                (model(xs).square().sum(1).mean() / 2).backward()
            if watch:
                with pytest.raises(pergrad.VerificationError, match=r"'0.weight' .* do not add up"):
                    pe.result("mean")
            else:
                pe.result("mean")  # unwatched: the wrong number, as before
