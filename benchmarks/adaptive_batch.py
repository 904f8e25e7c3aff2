"""``--batch-size auto`` against fixed batch sizes at both ends of its range, on digits.

Each setting trains the default MLP on scikit-learn's digits with SGD and momentum 0.9 for the
default 12 epochs, for several seeds (the seed fixes the split, the initial weights and the
batch order). The learning rate follows the same linear rule in every setting, η = 0.05 · B / 16:
the adaptive run scales it as its batch changes, the fixed runs use the value of their B. A run
logs every 2 steps; "steps to target" is the first logged step whose validation loss is at or
below the target (chosen before the runs), "examples to target" the examples seen by then.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/adaptive_batch.py`` (about 10 minutes on two
CPU cores); it prints the table and writes ``benchmarks/ADAPTIVE_BATCH.md``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path

from pergrad.train.config import TrainConfig
from pergrad.train.loop import train
from pergrad.train.metrics import Column

BASE_LR, B_MIN, B_MAX = 0.05, 16, 128
SETTINGS = {
    f"auto ({B_MIN}–{B_MAX})": dict(batch_size="auto", min_batch_size=B_MIN, max_batch_size=B_MAX, lr=BASE_LR),
    f"fixed {B_MIN}": dict(batch_size=B_MIN, lr=BASE_LR),
    f"fixed {B_MAX}": dict(batch_size=B_MAX, lr=BASE_LR * B_MAX / B_MIN),
}


def run_one(setting: dict, seed: int, target: float, out: Path) -> dict:
    """Train one setting and seed; what the table shows."""
    config = TrainConfig(seed=seed, log_every=2, out=str(out), **setting)
    rows = train(config, quiet=True, stream=io.StringIO()).rows
    reached = next((r for r in rows if r[Column.VAL_LOSS] <= target), None)
    last = rows[-1]
    sizes = [r[Column.BATCH_SIZE] for r in rows]
    return {
        "steps": None if reached is None else reached[Column.STEP],
        "examples": None if reached is None else reached[Column.EXAMPLES],
        "final_val_loss": last[Column.VAL_LOSS],
        "final_val_accuracy": last[Column.VAL_ACCURACY],
        "total_steps": last[Column.STEP],
        "batch_sizes": f"{min(sizes)}–{max(sizes)}, last {sizes[-1]}",
    }


def table(results: dict, target: float) -> str:
    head = (
        f"| setting | seed | steps to val loss ≤ {target:g} | examples to it | final val loss | final val accuracy "
        "| steps in all | B used (logged rows) |\n|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for name, runs in results.items():
        for seed, r in runs.items():
            steps = "not reached" if r["steps"] is None else r["steps"]
            examples = "–" if r["examples"] is None else r["examples"]
            lines.append(
                f"| {name} | {seed} | {steps} | {examples} | {r['final_val_loss']:.4f} | "
                f"{r['final_val_accuracy']:.3f} | {r['total_steps']} | {r['batch_sizes']} |"
            )
        lines.append(_median_line(name, runs))
    return head + "\n".join(lines) + "\n"


def _median_line(name: str, runs: dict) -> str:
    def med(key, fmt):
        values = [r[key] for r in runs.values() if r[key] is not None]
        return fmt.format(statistics.median(values)) if len(values) == len(runs) else "–"

    return (
        f"| **{name}: median** | | **{med('steps', '{:.0f}')}** | **{med('examples', '{:.0f}')}** | "
        f"**{med('final_val_loss', '{:.4f}')}** | **{med('final_val_accuracy', '{:.3f}')}** | "
        f"{med('total_steps', '{:.0f}')} | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.2, help="validation loss to reach")
    parser.add_argument("--output", default=str(Path(__file__).with_name("ADAPTIVE_BATCH.md")))
    args = parser.parse_args()
    results: dict = {name: {} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for i, (name, setting) in enumerate(SETTINGS.items()):
                results[name][seed] = run_one(setting, seed, args.target, Path(tmp) / f"{i}-{seed}")
                print(name, seed, results[name][seed], flush=True)
    text = table(results, args.target)
    print(text)
    Path(args.output).write_text(
        "# `--batch-size auto` on digits\n\nWritten by `benchmarks/adaptive_batch.py` (see its docstring for the method).\n\n"
        + text
    )


if __name__ == "__main__":
    main()
