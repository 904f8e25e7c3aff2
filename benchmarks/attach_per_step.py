"""What ``with PerExample(model)`` around every step costs, and what the single-example check costs.

The README's pattern hooks the model anew at every step::

    with pergrad.PerExample(model) as pe:
        result = pe.backward(losses)

The check against autograd runs once per model and settings (``pergrad.verify.checks_of``), so
after the first step this costs the hooking and unhooking only. The script times, per workload,
in rounds that rotate the order of the methods:

- ``plain``: ``losses.mean().backward()``;
- ``attached``: one ``PerExample`` attached before the timer, ``pe.backward`` per step (the model
  already verified);
- ``with``: a new ``PerExample`` around every step (the README's pattern);
- ``check 2``: ``verify=True``, the check of examples 0 and n−1 on every step: what the first
  step of a model costs;
- ``check 1``: ``verify=1``, one example checked on every step: what each checked step of the
  periodic check ``verify=k`` costs (amortised over k steps: (check 1 − attached) / k);
- ``paused``: one ``PerExample`` attached, the plain step run inside ``pe.paused()``: what an
  unmeasured step of ``measure_every`` costs (target: at most 1.03× ``plain``).

It prints the median time per step and the median ratios, per round, to ``attached`` and to
``plain`` (``--threads``, default 2). Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/attach_per_step.py            # MLP and Llama
    PYTHONPATH=src .venv/bin/python benchmarks/attach_per_step.py --rounds 5 --only mlp
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pergrad  # noqa: E402
import workloads as wl  # noqa: E402
from workloads import Workload, llama, mlp, seconds_per_step  # noqa: E402

METHODS = ("plain", "attached", "with", "check 2", "check 1", "paused")
VERIFY = {"attached": "first", "check 2": True, "check 1": 1}


def plain_step(w: Workload) -> None:
    w.model.zero_grad(set_to_none=True)
    w.loss_fn(w.model(w.x), w.y).mean().backward()


def pergrad_step(w: Workload, pe: pergrad.PerExample) -> None:
    w.model.zero_grad(set_to_none=True)
    pe.backward(w.loss_fn(w.model(w.x), w.y), reduction="mean")


def timed(w: Workload, method: str, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps of ``method``."""
    if method == "plain":
        return seconds_per_step(lambda: plain_step(w), steps)
    if method == "with":

        def step_with():
            with pergrad.PerExample(w.model) as pe:
                pergrad_step(w, pe)

        return seconds_per_step(step_with, steps)
    pe = pergrad.PerExample(w.model, verify=VERIFY.get(method, "first"))
    try:
        if method == "paused":
            with pe.paused():
                return seconds_per_step(lambda: plain_step(w), steps)
        return seconds_per_step(lambda: pergrad_step(w, pe), steps)
    finally:
        pe.remove()


def measure(w: Workload, rounds: int, warmup: int, target: float, methods: tuple[str, ...] = METHODS) -> dict[str, list[float]]:
    """{method: [seconds per step, one per round]}."""
    with pergrad.PerExample(w.model) as pe:  # the model's first step: verified here, before timing
        pergrad_step(w, pe)
    one = timed(w, "plain", 3)
    steps = max(1, round(target / one))
    times: dict[str, list[float]] = {m: [] for m in methods}
    gc.disable()
    try:
        for r in range(warmup + rounds):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for method in order:
                t = timed(w, method, steps)
                if r >= warmup:
                    times[method].append(t)
    finally:
        gc.enable()
    return times


def table(w: Workload, times: dict[str, list[float]]) -> str:
    rows = [f"### {w.name}", "", "| method | ms per step | × attached | × plain |", "|---|---|---|---|"]
    for m in times:
        ms = statistics.median(times[m]) * 1e3
        vs_attached = statistics.median(a / b for a, b in zip(times[m], times["attached"]))
        vs_plain = statistics.median(a / b for a, b in zip(times[m], times["plain"]))
        rows.append(f"| {m} | {ms:.2f} | {vs_attached:.3f} | {vs_plain:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=100.0, help="length of one measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["mlp", "llama"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="a subset of the methods (plain and attached always)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="time under the system's malloc defaults (default: freed memory kept for reuse)")
    args = parser.parse_args(argv)
    wl.steady_allocator(args.system_malloc)
    torch.set_num_threads(args.threads)
    makers = {"mlp": mlp, "llama": llama}
    for key, make in makers.items():
        if args.only and key != args.only:
            continue
        w = make()
        methods = METHODS if not args.methods else tuple(m for m in METHODS if m in {"plain", "attached", *args.methods})
        print(table(w, measure(w, args.rounds, args.warmup, args.target_ms / 1e3, methods)), "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
