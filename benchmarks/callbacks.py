"""The cost of pergrad's framework callbacks: a Lightning and a Hugging Face Trainer step with
``PergradCallback`` against the same loop without it, in the same run (a ratio, not a timed test),
and with ``PergradCallback(measure_every=K)``: statistics on one step in K, the others paused.

    .venv/bin/python benchmarks/callbacks.py            # both frameworks, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/callbacks.py --steps 60 --repeats 5 --frameworks lightning train

Each configuration trains ``--steps`` optimizer steps (2 micro-batches each) once to warm up,
then ``--repeats`` times; the median time per step is reported, and the ratios to the plain loop.
Workloads: Lightning, an MLP 64-512-512-10 on batches of 128 (64 per micro-batch); Hugging Face,
a random-init Llama (2 layers, d=128, vocabulary 1000) on 16 sequences of 64 tokens per step.
``train``: ``pergrad train`` (its MLP on digits, batches of 128, one metrics row at the end); it has no
loop without pergrad, so its "plain" column is ``--measure-every`` larger than the run (only the
first step measured, the others paused).
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402


def _lightning_run(steps: int, measure_every: int | None) -> float:
    """Seconds per step; ``measure_every`` None: no callback."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from pergrad.integrations.lightning import PergradCallback

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * 128, 64, generator=g), torch.randint(0, 10, (steps * 128,), generator=g))
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[] if measure_every is None else [PergradCallback(measure_every=measure_every)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(MLP(), DataLoader(data, batch_size=64))
    return (time.perf_counter() - start) / steps


def _hf_run(steps: int, measure_every: int | None) -> float:
    import transformers as T_

    from pergrad.integrations.transformers import PergradCallback

    torch.manual_seed(0)
    config = T_.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = T_.LlamaForCausalLM(config)
    model.loss_type = "ForCausalLM"
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 1000, (steps * 16, 64), generator=g)]
    with tempfile.TemporaryDirectory() as out:
        args = T_.TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=steps,
            learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no",
        )  # fmt: skip
        trainer = T_.Trainer(model=model, args=args, train_dataset=rows)
        if measure_every is not None:
            PergradCallback.attach(trainer, measure_every=measure_every)
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps


def _train_run(steps: int, measure_every: int | None) -> float:
    """``pergrad train``'s loop; ``measure_every`` None: every step but the first paused."""
    from pergrad.train.config import TrainConfig
    from pergrad.train.loop import train

    per_epoch = 11  # 1438 training examples of digits in batches of 128
    epochs = -(-steps // per_epoch)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(out=out, batch_size=128, accumulate=2, epochs=epochs, log_every=10**9,
                             measure_every=10**9 if measure_every is None else measure_every)  # fmt: skip
        start = time.perf_counter()
        result = train(config, quiet=True, stream=io.StringIO())
        return (time.perf_counter() - start) / result.step


RUNS = {"lightning": _lightning_run, "transformers": _hf_run, "train": _train_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frameworks", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's cores)")
    parser.add_argument("--measure-every", type=int, nargs="+", default=[10], metavar="K",
                        help="a measure_every column for each K (default: 10)")  # fmt: skip
    parser.add_argument("--system-malloc", action="store_true",
                        help="time under the system's malloc defaults (default: freed memory kept for reuse)")
    args = parser.parse_args()
    wl.steady_allocator(args.system_malloc)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    ks = args.measure_every
    print("| framework | plain step (ms) | with PergradCallback (ms) | ratio |"
          + "".join(f" measure_every={k} (ms) | ratio |" for k in ks))  # fmt: skip
    print("|---|---|---|---|" + "---|---|" * len(ks))
    configs = (None, 1, *ks)
    for name in args.frameworks:
        run = RUNS[name]
        for every in configs:  # warm-up
            run(args.steps, every)
        times: dict[int | None, list[float]] = {every: [] for every in configs}
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits all alike
            for every in configs:
                times[every].append(run(args.steps, every))
        plain = statistics.median(times[None])
        cells = [f"{plain * 1e3:.1f}"]
        for every in configs[1:]:
            t = statistics.median(times[every])
            cells += [f"{t * 1e3:.1f}", f"{t / plain:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
