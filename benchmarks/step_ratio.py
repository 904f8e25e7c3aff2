"""Step-time ratio of a pergrad training step to a plain one, on three small CPU workloads.

A *step* is: zero the gradients (``set_to_none``), forward, per-example losses, one backward.
The plain step ends with ``losses.mean().backward()``; a pergrad step with
``pe.backward(losses, reduction="mean")``, which also yields the per-example quantities. No
optimizer update is timed (it is the same for both). Three pergrad modes are measured:

    norms        PerExample(model)                      sq_norms only (the default mode)
    norms+2nd    PerExample(model, second_moment=True)  sq_norms and Σⱼ (∇ℓⱼ)² per parameter
    grads        PerExample(model, grads=True)          sq_norms and every (n, *p.shape) gradient

Method. One model and one batch per workload serve every method. Before timing, each mode's
result is checked against ``torch.func.vmap(grad(...))`` on the first examples of the same
batch (and its ``.grad`` against the plain step's), so a wrong computation is never timed.
After a warm-up, each of R rounds measures every method once, in an order rotated every
round; the ratio of a mode in a round is its time over the plain time of that round, and the
table reports the medians over rounds. One measurement averages as many consecutive steps of
its method as last about ``--target-ms`` (at least one): a single millisecond-scale step on a
shared CPU is too noisy, and whichever step runs first after any pause is slower. ``PerExample``
is created before a measurement's timer starts and removed after it stops: hooking the model
is a one-off cost in training, and no hook may be live during a plain step. The garbage
collector is off while timing (tensors are freed by reference counting).

Run: ``.venv/bin/python benchmarks/step_ratio.py`` (``make bench``); ``--quick`` for a smoke
run, ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

import pergrad
import workloads as wl
from workloads import Workload

MODES = {  # steady state: the first-backward check against autograd is off
    "norms": {"verify": False},
    "norms+2nd": {"second_moment": True, "verify": False},
    "grads": {"grads": True, "verify": False},
}
RTOL = 1e-4  # float32 relative tolerance of the sanity checks
CHECKED = 4  # examples checked against torch.func


# --- workloads (defined in workloads.py, shared with run.py) ----------------------------------


WORKLOADS = {  # key: builder(seed); the first three run by default, the others when named with --only
    "mlp": lambda seed: wl.mlp(seed=seed),
    "cnn": lambda seed: wl.cnn(seed=seed),
    "transformer": lambda seed: wl.transformer(seed=seed),
    "sdpa": lambda seed: wl.transformer(seed=seed, sdpa=True, key="sdpa"),
    "llama": lambda seed: wl.llama(seed=seed),
    "llama-4x256": lambda seed: wl.llama(seed=seed, key="llama-4x256", layers=4, d=256, hidden=688),
    "vit": lambda seed: wl.vit(seed=seed),
    "gpt-tied": lambda seed: wl.gpt2_tied(8, 64, seed=seed, key="gpt-tied", d=192, heads=4, vocab=20000),
    "gpt2-tied": lambda seed: wl.gpt2_tied(8, 128, seed=seed),
}
DEFAULT = ["mlp", "cnn", "transformer"]


def workloads(seed: int, keys: list[str]) -> list[Workload]:
    return [WORKLOADS[k](seed) for k in keys]


# --- the two kinds of step -------------------------------------------------------------------


def plain_step(w: Workload) -> None:
    w.model.zero_grad(set_to_none=True)
    losses = w.loss_fn(w.model(w.x), w.y)
    losses.mean().backward()


def pergrad_step(w: Workload, pe: pergrad.PerExample) -> pergrad.PerExampleResult:
    w.model.zero_grad(set_to_none=True)
    losses = w.loss_fn(w.model(w.x), w.y)
    return pe.backward(losses, reduction="mean")


def timed(w: Workload, mode: str, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps of ``mode`` ("plain" or a key of MODES).

    For a pergrad mode, ``PerExample`` hooks the model before the timer starts and is removed
    after it stops.
    """
    if mode == "plain":
        return wl.seconds_per_step(lambda: plain_step(w), steps)
    pe = pergrad.PerExample(w.model, **MODES[mode])
    try:
        return wl.seconds_per_step(lambda: pergrad_step(w, pe), steps)
    finally:
        pe.remove()


# --- sanity checks ---------------------------------------------------------------------------


def reference_grads(w: Workload, k: int) -> dict[str, Tensor]:
    """{name: (k, *p.shape)} gradients of the first k examples' own losses, by torch.func."""
    params = {name: p.detach() for name, p in w.model.named_parameters()}

    def loss(p, xj, yj):
        return w.loss_fn(functional_call(w.model, p, (xj.unsqueeze(0),)), yj.unsqueeze(0))[0]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap over attention
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, w.x[:k], w.y[:k])


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference over the largest absolute expected value."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check(w: Workload) -> list[str]:
    """Check every mode on the full batch; return the failures (empty when all agree)."""
    failures = []

    def expect(what: str, err: float) -> None:
        if not err <= RTOL:
            failures.append(f"{w.name}: {what} relative error {err:.2e} > {RTOL:.0e}")

    ref = reference_grads(w, CHECKED)
    ref_sq = sum(g.reshape(CHECKED, -1).square().sum(1) for g in ref.values())  # (k,)
    plain_step(w)
    plain_grads = {name: p.grad.clone() for name, p in w.model.named_parameters()}
    results = {}
    for mode, options in MODES.items():
        with pergrad.PerExample(w.model, **options) as pe:
            res = results[mode] = pergrad_step(w, pe)
        expect(f"{mode}: sq_norms[:{CHECKED}] vs torch.func", rel_err(res.sq_norms[:CHECKED], ref_sq))
        for name, p in w.model.named_parameters():
            expect(f"{mode}: {name}.grad vs plain step", rel_err(p.grad, plain_grads[name]))
    for name, g in results["grads"].grads.items():
        expect(f"grads: {name}[:{CHECKED}] vs torch.func", rel_err(g[:CHECKED], ref[name]))
        # the second moments against the materialised gradients of the whole batch
        expect(f"norms+2nd: second_moment[{name}] vs Σ grads²",
               rel_err(results["norms+2nd"].second_moment[name], g.square().sum(0)))
    return failures


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Row:
    """Medians over rounds: plain step seconds; per mode, step seconds, ratio to plain and the
    ratio's interquartile range."""

    name: str
    plain: float
    seconds: dict[str, float]
    ratio: dict[str, float]
    iqr: dict[str, tuple[float, float]]


def steps_per_measurement(w: Workload, mode: str, target: float) -> int:
    """Consecutive steps of ``mode`` that make one measurement last about ``target`` seconds."""
    one = min(timed(w, mode, 1) for _ in range(3))
    return max(1, round(target / one))


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def measure(w: Workload, rounds: int, warmup: int, target: float, modes: list[str]) -> Row:
    methods = ["plain", *modes]
    steps = {m: steps_per_measurement(w, m, target) for m in methods}
    for _ in range(warmup):
        for m in methods:
            timed(w, m, steps[m])
    times: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed step would charge one method at random
    try:
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            this = {m: timed(w, m, steps[m]) for m in order}
            for m in methods:
                times[m].append(this[m])
            for m in modes:
                ratios[m].append(this[m] / this["plain"])
    finally:
        if gc_was_enabled:
            gc.enable()
    return Row(
        w.name,
        statistics.median(times["plain"]),
        {m: statistics.median(times[m]) for m in modes},
        {m: statistics.median(ratios[m]) for m in modes},
        {m: quartiles(ratios[m]) for m in modes},
    )


def table(rows: list[Row], modes: list[str]) -> str:
    head = f"{'workload':<44} {'plain ms':>9}" + "".join(f" {m + ' ms':>13} {'ratio [IQR]':>18}" for m in modes)
    lines = [head, "-" * len(head)]
    for row in rows:
        line = f"{row.name:<44} {row.plain * 1e3:>9.2f}"
        for m in modes:
            lo, hi = row.iqr[m]
            line += f" {row.seconds[m] * 1e3:>13.2f} {row.ratio[m]:>5.2f}x [{lo:.2f}-{hi:.2f}]"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per workload (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, 1 warm-up round: a smoke run")
    parser.add_argument("--target-ms", type=float, default=50.0,
                        help="about how long one measurement lasts, in steps of its method (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--only", choices=list(WORKLOADS), action="append",
                        help=f"run only this workload (repeatable; default {' '.join(DEFAULT)})")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="pergrad modes to time (default all)")
    parser.add_argument("--no-check", action="store_true", help="skip the sanity checks (timing only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-malloc", action="store_true",
                        help="time under the system's malloc defaults (default: freed memory kept for reuse)")
    args = parser.parse_args(argv)
    wl.steady_allocator(args.system_malloc)
    rounds, warmup = (5, 1) if args.quick else (args.rounds, args.warmup)

    torch.set_num_threads(args.threads)
    chosen = workloads(args.seed, args.only or DEFAULT)

    failures = [] if args.no_check else [f for w in chosen for f in check(w)]
    if failures:
        print("Sanity check failed; nothing timed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"sanity: every mode's sq_norms match torch.func on the first {CHECKED} examples "
          f"(rtol {RTOL:.0e}), .grad matches the plain step, grads and second moments agree")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU; "
          f"median of {rounds} rounds after {warmup} untimed; one measurement averages "
          f"the steps of about {args.target_ms:g} ms; {wl.allocator_note()}\n")
    rows = []
    for w in chosen:
        rows.append(measure(w, rounds, warmup, args.target_ms / 1e3, args.modes))
        print(table(rows[-1:], args.modes).splitlines()[-1], flush=True)
    print()
    print(table(rows, args.modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
