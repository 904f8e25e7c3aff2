"""pergrad's fixed cost per step: models so narrow that their arithmetic takes almost no time.

What is left of a pergrad step over a plain one is then the Python that runs per hooked module
(forward hooks, the example-axis tracker, gradient hooks, records and their reductions) and the
dispatch of its small tensor operations: the cost that a GPU, which runs the arithmetic of a small
model in microseconds, would make the whole difference. Reported in microseconds per step, split
into the forward and the backward (``pe.backward`` with everything it computes), and per module.

Models (1 thread, float32, n=8, steady allocator as in the other timing scripts):

    mlp     8 blocks of Linear(16, 16) + ReLU, and a Linear head: 9 Linear modules
    seq     the same blocks with a LayerNorm, on sequences of 5 positions: 9 Linear, 8 LayerNorm
    llama   transformers' LlamaForCausalLM, 2 layers, d=16, vocabulary 64, t=8 (n=4): 21 modules
            (embedding, 14 Linear, 5 RMSNorm taking the direct path, the head)

Method: rounds alternate a plain step and a pergrad step (``verify=False``) of the same model;
medians over rounds. Run: ``.venv/bin/python benchmarks/overhead.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402

import pergrad  # noqa: E402


def _mlp():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(8)], nn.Linear(16, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    return model, x, lambda out: F.cross_entropy(out, y, reduction="none")


def _seq():
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()) for _ in range(8)]
    model = nn.Sequential(*blocks, nn.Linear(16, 4))
    x, y = torch.randn(8, 5, 16), torch.randint(0, 4, (8,))
    return model, x, lambda out: F.cross_entropy(out.mean(1), y, reduction="none")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
    model = wl.LogitsOf(LlamaForCausalLM(config), "input_ids")
    x, y = torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8))
    return model, x, lambda out: wl.next_token_losses(out, y)


MODELS = {"mlp": _mlp, "seq": _seq, "llama": _llama}


def measure(key: str, rounds: int) -> dict[str, float]:
    """Medians in µs: plain forward and backward, pergrad's extra in each, per module."""
    torch.manual_seed(0)
    model, x, loss_fn = MODELS[key]()
    pe = pergrad.PerExample(model, verify=False)
    times: dict[str, list[float]] = {k: [] for k in ("plain fwd", "plain bwd", "pe fwd", "pe bwd")}

    def step(kind: str) -> None:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if kind == "plain":
            with pe.paused():
                losses = loss_fn(model(x))
            middle = time.perf_counter()
            losses.mean().backward()
        else:
            losses = loss_fn(model(x))
            middle = time.perf_counter()
            pe.backward(losses)
        end = time.perf_counter()
        times[f"{kind} fwd"].append(middle - start)
        times[f"{kind} bwd"].append(end - middle)

    for r in range(rounds + 20):
        if r == 20:  # warm-up done
            for v in times.values():
                v.clear()
        step("plain")
        step("pe")
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    modules = len(pe.paths)
    pe.remove()
    extra_fwd, extra_bwd = med["pe fwd"] - med["plain fwd"], med["pe bwd"] - med["plain bwd"]
    return {"modules": modules, "plain": med["plain fwd"] + med["plain bwd"], "forward": extra_fwd,
            "backward": extra_bwd, "total": extra_fwd + extra_bwd, "per module": (extra_fwd + extra_bwd) / modules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=300, help="alternating rounds (default 300)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="time under the system's malloc defaults (default: freed memory kept for reuse)")
    args = parser.parse_args(argv)
    wl.steady_allocator(args.system_malloc)
    torch.set_num_threads(1)
    gc.disable()
    print(f"torch {torch.__version__}, 1 thread, median of {args.rounds} alternating rounds; {wl.allocator_note()}\n")
    print("| model | hooked modules | plain step µs | pergrad's extra: forward | backward | step | per module |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in args.models:
        m = measure(key, args.rounds)
        print(f"| {key} | {m['modules']} | {m['plain']:.0f} | +{m['forward']:.0f} | +{m['backward']:.0f} | "
              f"+{m['total']:.0f} | +{m['per module']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
