"""pergrad.integrations.transformers: a stock transformers.Trainer on a tiny random-init causal LM
with an in-memory dataset, gradient accumulation and clipping; its logged statistics against
pergrad run by hand on the same batches and weights, and read back from TensorBoard's files.

By hand: one ``PerExample.backward`` of each step's whole batch, with example j's loss
ℓⱼ = B · tⱼ / N_tokens (tⱼ its summed token loss, N_tokens the step's predicted tokens, as the
Trainer's loss divides by), at the weights the step started from; the mean gradient of that
backward is the unclipped one.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T_
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pergrad
from pergrad.integrations.transformers import PergradCallback
from pergrad.stats import NoiseScale, ParamSNR, norm_quantiles
from pergrad.train.metrics import Column, read_metrics

from workers import run_two_workers

V, LENGTH, EXAMPLES, BETA = 24, 8, 24, 0.9
REL = 1e-6  # float32 logits in transformers' loss (see above)


def _model() -> T_.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = T_.GPT2Config(vocab_size=V, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = T_.GPT2LMHeadModel(config).double()
    model.loss_type = "ForCausalLM"  # as a pretrained causal LM has it: the Trainer counts shifted labels
    return model


def _dataset() -> list[dict]:
    """Sequences of a repeating pattern with noise; a few tokens masked (-100) so that examples
    predict different numbers of tokens."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(EXAMPLES):
        start = int(torch.randint(0, V, (1,), generator=g))
        ids = (start + torch.arange(LENGTH) * 3) % V
        ids = torch.where(torch.rand(LENGTH, generator=g) < 0.2, torch.randint(0, V, (LENGTH,), generator=g), ids)
        labels = ids.clone()
        labels[: int(torch.randint(0, 4, (1,), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class Recorder(T_.TrainerCallback):
    """The weights at each step's start (the test's own callback)."""

    def __init__(self):
        self.weights = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def train(tmp_path, accumulate: int, batch_size: int, max_grad_norm: float, model=None, callback_options=None,
          **extra):  # fmt: skip
    """Train 3 steps of ``model`` (default ``_model()``) with the callback writing ``tmp_path/run``."""
    seen = []

    def collate(rows):
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        seen.append(batch)
        return batch

    args = T_.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulate, max_steps=3, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=max_grad_norm, logging_steps=1,
        report_to=["tensorboard"], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra,
    )  # fmt: skip
    recorder = Recorder()
    model = _model() if model is None else model
    trainer = T_.Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=collate, callbacks=[recorder])
    callback = PergradCallback.attach(trainer, beta=BETA, run_dir=tmp_path / "run", **(callback_options or {}))
    trainer.train()
    return trainer, callback, recorder.weights, seen


def _by_hand(weights, steps):
    """{Column: value} after each step; ``steps``: each step's micro-batches (of all workers)."""
    model = _model()
    noise, snr = NoiseScale(beta=BETA), ParamSNR(beta=BETA)
    rows = []
    for w, batches in zip(weights, steps):
        ids = torch.cat([b["input_ids"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        model.load_state_dict(w)
        model.zero_grad(set_to_none=True)
        with pergrad.PerExample(model, second_moment=True) as pe:
            logits = model(input_ids=ids).logits[:, :-1]
            target = labels[:, 1:]
            tokens = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=-100).sum(1)
            n_tokens = int((target != -100).sum())
            result = pe.backward(tokens * ids.shape[0] / n_tokens)
        noise.update(result)
        snr.update(result)
        e = noise.estimate(0.95)
        q = norm_quantiles(result.norms, [0.1, 0.5, 0.9])
        row = {Column.B_SIMPLE: e.b_simple, Column.TRACE_SIGMA: e.trace_sigma, Column.GRAD_SQ_NORM: e.grad_sq_norm,
               "norm_q10": float(q[0]), "norm_q50": float(q[1]), "norm_q90": float(q[2]),
               Column.NORM_MAX: float(result.norms.max())}  # fmt: skip
        row.update({Column.snr(k): v for k, v in snr.layer_snr().items()})
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hf")
    return tmp_path, *train(tmp_path, accumulate=2, batch_size=4, max_grad_norm=0.05)


def test_logged_statistics_equal_pergrad_by_hand_with_accumulation_and_clipping(clipped):
    tmp_path, trainer, callback, weights, seen = clipped
    expected = _by_hand(weights, [seen[i : i + 2] for i in range(0, len(seen), 2)])
    assert len(expected) == 3
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for step, (log, want) in enumerate(zip(logs, expected)):
        assert log["grad_norm"] > 0.05  # the Trainer clipped every step
        for key, value in want.items():
            assert log["pergrad/" + key] == pytest.approx(value, rel=REL, abs=1e-9), f"step {step + 1}, {key}"
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r[Column.STEP] for r in rows] == [1, 2, 3]
    assert [r[Column.BATCH_SIZE] for r in rows] == [8, 8, 8]
    for row, log in zip(rows, logs):
        assert row[Column.LOSS] == log["loss"]
        assert row[Column.B_SIMPLE] == log["pergrad/b_simple"]


def test_tensorboard_files_hold_the_values_of_metrics_csv(clipped):
    tmp_path, *_ = clipped
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    files = list((tmp_path / "out").rglob("events.out.tfevents.*"))  # the Trainer's TensorBoard run
    assert len(files) == 1
    events = EventAccumulator(str(files[0]))
    events.Reload()
    tags = events.Tags()["scalars"]
    for column in (Column.B_SIMPLE, Column.TRACE_SIGMA, Column.GRAD_SQ_NORM, "norm_q50", "snr/transformer.wte.weight"):
        tag = next(t for t in tags if t.endswith("pergrad/" + column))
        logged = {e.step: e.value for e in events.Scalars(tag)}
        for row in rows:
            assert logged[row[Column.STEP]] == pytest.approx(row[column], rel=1e-6), (column, row[Column.STEP])


def test_k_micro_batches_give_the_statistics_of_one_backward_of_the_whole_batch(tmp_path):
    _, k1, _, _ = train(tmp_path / "k1", accumulate=1, batch_size=8, max_grad_norm=0.0)
    _, k2, _, _ = train(tmp_path / "k2", accumulate=2, batch_size=4, max_grad_norm=0.0)
    one, two = k1.statistics.values(), k2.statistics.values()
    assert set(one) == set(two)
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=REL, abs=1e-9), key


def test_torchrun_ddp_on_two_gloo_processes_merges_the_workers(tmp_path):
    ranks = run_two_workers("hf_worker.py", tmp_path)
    by_rank = [[r["seen"][i : i + 2] for i in range(0, len(r["seen"]), 2)] for r in ranks]
    steps = [a + b for a, b in zip(*by_rank)]  # the global batch: both workers' micro-batches
    expected = _by_hand(ranks[0]["weights"], steps)
    logs = [h for h in json.loads((tmp_path / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == len(expected) == 3
    for step, (log, want) in enumerate(zip(logs, expected)):
        for key, value in want.items():  # SNRs near 0 are differences of the float32-rounded sums
            assert log["pergrad/" + key] == pytest.approx(value, rel=REL, abs=1e-7), f"step {step + 1}, {key}"


def test_measure_every_adds_metrics_only_to_logs_of_measured_steps(tmp_path):
    """measure_every=2 over 3 steps, clipping on: steps 0 and 2 are measured, as a NoiseScale of those
    two steps alone would have them (the clipping factor of step 2 from its own gradients only);
    step 1's log and row have the loss and no statistics."""
    trainer, callback, weights, seen = train(tmp_path, accumulate=2, batch_size=4, max_grad_norm=0.05,
                                             callback_options={"measure_every": 2})  # fmt: skip
    steps = [seen[i : i + 2] for i in range(0, len(seen), 2)]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert [any(k.startswith("pergrad/") for k in entry) for entry in logs] == [True, False, True]
    expected = _by_hand([weights[0], weights[2]], [steps[0], steps[2]])
    for entry, want in zip([logs[0], logs[2]], expected):
        for key, value in want.items():
            assert entry["pergrad/" + key] == pytest.approx(value, rel=REL), key
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r[Column.STEP] for r in rows] == [1, 2, 3]
    assert rows[1][Column.LOSS] is not None and rows[1][Column.B_SIMPLE] is None and rows[1]["norm_q50"] is None
    assert callback.statistics.steps == 2
