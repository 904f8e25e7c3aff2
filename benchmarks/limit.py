"""How close a pergrad step can come to a plain one on this machine, by the arithmetic alone.

A per-example squared norm costs, beyond autograd's own work, nothing for a weight used once per
example (‖a‖²‖g‖², a pass over a and g) and, for a weight applied at t > 1 positions, the cheaper of
two exact forms (see ``pergrad.rules._sequence.build_in_backward``): the Gram form on top of autograd's
weight gradient, or building the per-example pieces in the backward pass in its place. This script
times, for every ``nn.Linear`` (and GPT-2 ``Conv1D``) call of a workload's forward with t > 1, the
weight-gradient matmul autograd runs (``gᵀa``), the Gram form and the built pieces, on the call's own
shapes with the caches holding other data (as in a step), and reports the limit

    1 + Σ_calls min(Gram, built − matmul) / plain step time

next to the plain step: what no implementation of the same two forms can go below on this machine,
however little Python it runs. Convolutions, norm layers and embeddings are left out (their extra
arithmetic is a pass over tensors of the activations' size), so the limit is a lower bound.

Run: ``.venv/bin/python benchmarks/limit.py`` (``--only KEY`` repeatable; keys of ``step_ratio.py``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
import workloads as wl
from torch import nn

from pergrad.rules import _sequence

WORKLOADS = {
    "mlp": lambda: wl.mlp(),
    "transformer": lambda: wl.transformer(),
    "sdpa": lambda: wl.transformer(sdpa=True),
    "sdpa-t256": lambda: wl.transformer(n=16, t=256, sdpa=True),
    "llama": lambda: wl.llama(),
    "llama-4x256": lambda: wl.llama(layers=4, d=256, hidden=688),
    "vit": lambda: wl.vit(),
    "gpt-tied": lambda: wl.gpt2_tied(8, 64, d=192, heads=4, vocab=20000),
}


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(i, o) of an nn.Linear or of transformers' Conv1D (GPT-2's, weight (i, o)); None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def linear_calls(work: wl.Workload) -> list[tuple[int, int, int, int]]:
    """(n, t, i, o) of every call of a weight applied at t > 1 positions in one forward (examples-first)."""
    shapes = []

    def hook(module, args, output):
        i, o = _widths(module)
        x = args[0]
        t = x.numel() // (x.shape[0] * i)
        if t > 1:
            shapes.append((x.shape[0], t, i, o))

    handles = [m.register_forward_hook(hook) for m in work.model.modules() if _widths(m) is not None]
    with torch.no_grad():
        work.model(work.x)
    for h in handles:
        h.remove()
    return shapes


def plain_step_seconds(work: wl.Workload, rounds: int = 7) -> float:
    def step():
        work.model.zero_grad(set_to_none=True)
        work.loss_fn(work.model(work.x), work.y).mean().backward()

    for _ in range(2):
        step()
    return statistics.median(wl.seconds_per_step(step, 3) for _ in range(rounds))


def extra_seconds(n: int, t: int, i: int, o: int) -> tuple[float, float, float]:
    """(matmul, Gram, built) seconds for one call's shapes, median of cold-cache timings."""
    a, g = torch.randn(n, t, i), torch.randn(n, t, o)
    flat_a, flat_g = a.reshape(-1, i), g.reshape(-1, o)
    matmul = _sequence._seconds(lambda: flat_g.T @ flat_a, a)
    gram = _sequence._seconds(lambda: _sequence.weight_sq_norms(a, g), a)
    built = _sequence._seconds(lambda: _sequence.reduced_pieces(a, g), a)
    return matmul, gram, built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(WORKLOADS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-malloc", action="store_true",
                        help="time under the system's malloc defaults (default: freed memory kept for reuse)")
    args = parser.parse_args(argv)
    wl.steady_allocator(args.system_malloc)
    torch.set_num_threads(args.threads)
    gc.disable()
    print(f"torch {torch.__version__}, {args.threads} threads; {wl.allocator_note()}\n")
    print("| workload | plain ms | calls with t > 1 | Gram ms | built − matmul ms | cheaper, summed ms | limit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in args.only or list(WORKLOADS):
        torch.manual_seed(0)
        work = WORKLOADS[key]()
        plain = plain_step_seconds(work)
        calls = linear_calls(work)
        cost: dict[tuple, tuple[float, float, float]] = {}
        gram = built = cheaper = 0.0
        for shape in calls:
            if shape not in cost:
                cost[shape] = extra_seconds(*shape)
            m, gr, b = cost[shape]
            gram, built, cheaper = gram + gr, built + (b - m), cheaper + min(gr, max(b - m, 0.0))
        print(f"| {work.name} | {plain * 1e3:.2f} | {len(calls)} | {gram * 1e3:.2f} | {built * 1e3:.2f} | "
              f"{cheaper * 1e3:.2f} | {1 + cheaper / plain:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
