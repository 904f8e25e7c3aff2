"""Per-example gradient norms, tool against tool: pergrad, torch.func, Opacus and BackPACK.

Every method times a FULL training step without the optimizer update: zero the gradients
(``set_to_none``), forward, per-example losses ``(n,)``, backward, and the per-example squared
gradient norms available as a tensor of shape ``(n,)``. The methods:

    plain              losses.mean().backward()                               (no norms: the yardstick)
    pergrad            PerExample(model)                                      sq_norms
    pergrad+2nd        PerExample(model, second_moment=True)                  sq_norms, Σᵢ (∇ℓᵢ)²
    pergrad-grads      PerExample(model, grads=True)                          sq_norms, every ∇ℓᵢ
    pergrad-verify     PerExample(model, verify=True): every step checked against autograd on two
                       examples, as the first step of every PerExample is (the others run verify=False)
    torch.func         vmap(grad(per-example loss via functional_call))      every ∇ℓᵢ, then norms
    opacus             GradSampleModule (hooks): p.grad_sample               every ∇ℓᵢ, then norms
    opacus-ghost       GradSampleModuleFastGradientClipping, ghost clipping: norms in a first backward,
                       then the second backward of Σᵢ cᵢ ℓᵢ that gives the clipped gradient (DP-SGD step)
    opacus-ghost-norms the same module, first backward only: norms and the unclipped gradient
    backpack           extend(model); with backpack(BatchL2Grad()): Σ_p p.batch_l2
    backpack+var       with backpack(BatchL2Grad(), Variance()): also the gradient variance

Method. One model and one batch per workload serve every method (the tools that hook or rewrite a
model get a deep copy with the same weights). Before timing, each method runs once and its per-example
squared norms must agree with pergrad's within a relative error of ``RTOL`` (and BackPACK's variance
with pergrad's second moments); a method that disagrees is reported as "wrong" and not timed, one that
raises as "unsupported" with the reason. After a warm-up, each of R rounds measures every method once,
in an order rotated every round; a method's ratio in a round is its time over the plain step's time in
that round, and the tables give the median (and interquartile range) over rounds. One measurement
averages as many consecutive steps as last about ``--target-ms``. pergrad's hooks are set before a
measurement's timer starts and removed after it stops; the garbage collector is off while timing.

Peak memory is measured in a separate process per (workload, method): ``run.py --memory-child
WORKLOAD METHOD``. After one step and clearing every gradient, the child records its resting memory,
runs two steps, and reports the peak above the resting level: on CPU the peak resident set size
(VmHWM, reset through /proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated``; with
``--largest-allocation``, one more step under torch's profiler gives the largest single allocation.

Run: ``.venv/bin/python benchmarks/run.py`` (``make bench``, about 10 minutes on two CPU cores);
``--quick`` for a smoke run (written to a temporary folder); ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import pergrad
import workloads as wl
from workloads import Workload

HERE = Path(__file__).resolve().parent
RTOL = 1e-3  # float32 relative tolerance of a tool's squared norms against pergrad's

warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap falling back to a loop
warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", module="backpack")
warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus hooks on the first layer


# --- workloads -------------------------------------------------------------------------------

WORKLOADS: dict[str, Callable[[str], Workload]] = {
    "mlp": lambda dev: wl.mlp(256, device=dev),
    "cnn": lambda dev: wl.cnn(64, device=dev),
    "transformer": lambda dev: wl.transformer(32, 64, device=dev),
    "sdpa": lambda dev: wl.transformer(32, 64, device=dev, sdpa=True, key="sdpa"),
    "mlp-1024": lambda dev: wl.mlp(1024, device=dev, key="mlp-1024"),
    "sdpa-t256": lambda dev: wl.transformer(16, 256, device=dev, sdpa=True, key="sdpa-t256"),
    "llama": lambda dev: wl.llama(16, 64, device=dev),
    "vit": lambda dev: wl.vit(32, device=dev),
    "llama-4x256": lambda dev: wl.llama(16, 64, device=dev, key="llama-4x256", layers=4, d=256, hidden=688),
    "gpt-tied": lambda dev: wl.gpt2_tied(8, 64, device=dev, key="gpt-tied", d=192, heads=4, vocab=20000),
    "gpt2-tied": lambda dev: wl.gpt2_tied(8, 128, device=dev),
}
QUICK_WORKLOADS = ["mlp", "cnn", "transformer", "sdpa"]
NEEDS_TRANSFORMERS = {"llama", "vit", "llama-4x256", "gpt-tied", "gpt2-tied"}  # run where transformers imports (not beside a CUDA torchvision)
# run only when named in --workloads: GPT-2's width and vocabulary make a step take seconds on a CPU and
# the other tools far longer (run it as --workloads gpt2-tied --methods pergrad)
OPT_IN_WORKLOADS = {"gpt2-tied"}


def _default_workloads() -> list[str]:
    """Every workload, less the transformers ones where transformers' models do not import."""
    try:
        import transformers  # noqa: F401

        transformers.LlamaForCausalLM, transformers.ViTForImageClassification  # noqa: B018
        return [k for k in WORKLOADS if k not in OPT_IN_WORKLOADS]
    except Exception:  # not installed, or broken by a torchvision that does not load
        print("transformers' models do not import here: skipping the llama and vit workloads", file=sys.stderr)
        return [k for k in WORKLOADS if k not in NEEDS_TRANSFORMERS | OPT_IN_WORKLOADS]

# scaling plot: x name -> (title, points, quick points, workload builder)
SCALING: dict[str, tuple[str, list[int], list[int], Callable[[int, str], Workload]]] = {
    "n": ("MLP 64-512-512-10: batch size n", [16, 32, 64, 128, 256, 512, 1024, 2048], [32, 256],
          lambda n, dev: wl.mlp(n, device=dev)),
    "t": ("Transformer 2L d128 SDPA, n=16: sequence length t", [16, 32, 64, 128, 256, 512], [16, 64],
          lambda t, dev: wl.transformer(16, t, device=dev, sdpa=True)),
}
SCALING_METHODS = ["plain", "pergrad", "torch.func", "opacus-ghost", "backpack"]


# --- methods ---------------------------------------------------------------------------------


class Method:
    """One way of running a step. ``step()`` returns the per-example squared norms (n,), or None."""

    key = ""
    label = ""
    package: str | None = None  # distribution that must be installed

    def __init__(self, w: Workload):
        self.w = w
        self.model = w.model

    def prepare(self) -> None:
        """One-off set-up (copies, wrappers); may raise for an unsupported workload."""

    def enter(self) -> None:
        """Before a measurement's timer starts (set hooks)."""

    def exit(self) -> None:
        """After a measurement's timer stops (remove hooks)."""

    def step(self) -> Tensor | None:
        raise NotImplementedError

    def clear(self) -> None:
        """Drop what a step leaves behind (gradients and the like)."""
        self.model.zero_grad(set_to_none=True)

    def validate(self) -> None:
        """After the first step: raise if the tool silently left some parameter out."""

    def losses(self, model: nn.Module | None = None) -> Tensor:
        return self.w.loss_fn((model or self.model)(self.w.x), self.w.y)


class Plain(Method):
    key, label = "plain", "plain"

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.losses().mean().backward()


class Pergrad(Method):
    """Steady state: the check against autograd that PerExample runs on its first backward is
    off here (``verify=False``); ``pergrad-verify`` times a step with it on."""

    key, label = "pergrad", "pergrad"
    options: dict = {"verify": False}

    def __init__(self, w: Workload):
        super().__init__(w)
        self.pe: pergrad.PerExample | None = None
        self.keep = False  # keep the last result (for the checks)
        self.result: pergrad.PerExampleResult | None = None

    def enter(self) -> None:
        self.pe = pergrad.PerExample(self.model, **self.options)

    def exit(self) -> None:
        if self.pe is not None:
            self.pe.remove()
            self.pe = None

    def step(self) -> Tensor:
        self.model.zero_grad(set_to_none=True)
        result = self.pe.backward(self.losses(), reduction="mean")
        if self.keep:
            self.result = result
        return result.sq_norms


class PergradSecond(Pergrad):
    key, label = "pergrad+2nd", "pergrad +2nd moment"
    options = {"second_moment": True, "verify": False}


class PergradGrads(Pergrad):
    key, label = "pergrad-grads", "pergrad grads"
    options = {"grads": True, "verify": False}


class PergradVerify(Pergrad):
    """A step checked against autograd on two examples (what the first backward of every
    PerExample costs, once)."""

    key, label = "pergrad-verify", "pergrad verified step"
    options = {"verify": True}


class TorchFunc(Method):
    key, label = "torch.func", "torch.func vmap(grad)"

    def prepare(self) -> None:
        model, loss_fn = self.model, self.w.loss_fn

        def one_loss(params: dict[str, Tensor], xj: Tensor, yj: Tensor) -> Tensor:
            return loss_fn(functional_call(model, params, (xj.unsqueeze(0),)), yj.unsqueeze(0))[0]

        self.per_example_grads = vmap(grad(one_loss), in_dims=(None, 0, 0))
        self.params = dict(model.named_parameters())

    def step(self) -> Tensor:
        self.model.zero_grad(set_to_none=True)
        n = self.w.n
        g = self.per_example_grads({k: p.detach() for k, p in self.params.items()}, self.w.x, self.w.y)
        sq = sum(gk.reshape(n, -1).square().sum(1) for gk in g.values())
        for k, p in self.params.items():  # the gradient of the mean loss, as the other methods leave it
            p.grad = g[k].mean(0)
        return sq


def _opacus_model(model: nn.Module) -> nn.Module:
    """A copy Opacus accepts: ``ModuleValidator.fix`` swaps nn.MultiheadAttention for
    DPMultiheadAttention with the same weights (what an Opacus user has to do)."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(copy.deepcopy(model))
    ModuleValidator.validate(fixed, strict=True)
    return fixed


class Opacus(Method):
    key, label = "opacus", "Opacus hooks"
    package = "opacus"

    def prepare(self) -> None:
        from opacus.grad_sample import GradSampleModule

        self.gsm = GradSampleModule(_opacus_model(self.model), batch_first=True, loss_reduction="mean")
        self.params = [p for p in self.gsm.parameters() if p.requires_grad]

    def step(self) -> Tensor:
        self.gsm.zero_grad(set_to_none=True)  # also drops p.grad_sample
        self.losses(self.gsm).mean().backward()
        n = self.w.n
        return sum(p.grad_sample.reshape(n, -1).square().sum(1) for p in self.params)

    def clear(self) -> None:
        self.gsm.zero_grad(set_to_none=True)


class OpacusGhost(Method):
    key, label = "opacus-ghost", "Opacus ghost clipping"
    package = "opacus"
    second_backward = True
    max_grad_norm = 1.0

    def prepare(self) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        self.gsm = GradSampleModuleFastGradientClipping(
            _opacus_model(self.model), batch_first=True, loss_reduction="mean",
            max_grad_norm=self.max_grad_norm, use_ghost_clipping=True)

    def step(self) -> Tensor:
        # What opacus.utils.fast_gradient_clipping_utils.DPTensorFastGradientClipping.backward does.
        self.gsm.zero_grad(set_to_none=True)
        losses = self.losses(self.gsm)
        losses.mean().backward(retain_graph=self.second_backward)
        if not self.second_backward:
            return self.gsm.get_norm_sample().square()
        coef = self.gsm.get_clipping_coef()  # also sets per_sample_gradient_norms
        self.gsm.zero_grad(set_to_none=True)
        self.gsm.disable_hooks()
        (coef * losses).sum().backward()
        self.gsm.enable_hooks()
        return self.gsm.per_sample_gradient_norms.square()

    def clear(self) -> None:
        self.gsm.zero_grad(set_to_none=True)


class OpacusGhostNorms(OpacusGhost):
    key, label = "opacus-ghost-norms", "Opacus ghost, norms only"
    second_backward = False


class Backpack(Method):
    key, label = "backpack", "BackPACK BatchL2Grad"
    package = "backpack-for-pytorch"
    variance = False

    def prepare(self) -> None:
        from backpack import extend
        from backpack.extensions import BatchL2Grad, Variance

        self.model = extend(copy.deepcopy(self.w.model))
        self.extensions = (BatchL2Grad(), Variance()) if self.variance else (BatchL2Grad(),)

    def step(self) -> Tensor:
        from backpack import backpack

        self.model.zero_grad(set_to_none=True)
        losses = self.losses()
        with backpack(*self.extensions):
            losses.mean().backward()
        n = self.w.n
        # BackPACK's individual gradients are those of ℓᵢ / n under a mean reduction
        # (a parameter without batch_l2 is reported by validate() after the first step)
        return sum(getattr(p, "batch_l2", 0) for p in self.model.parameters() if p.requires_grad) * (n * n)

    def validate(self) -> None:
        missing = sorted({type(m).__name__ for m in self.model.modules()
                          for p in m.parameters(recurse=False) if p.requires_grad and not hasattr(p, "batch_l2")})
        if missing:
            raise NotImplementedError(f"BackPACK has no BatchL2Grad extension for {', '.join(missing)} "
                                      "(their parameters get no batch_l2)")

    def clear(self) -> None:
        super().clear()
        for p in self.model.parameters():
            for attr in ("batch_l2", "variance"):
                if hasattr(p, attr):
                    delattr(p, attr)


class BackpackVariance(Backpack):
    key, label = "backpack+var", "BackPACK BatchL2Grad+Variance"
    variance = True


METHODS: dict[str, type[Method]] = {
    m.key: m for m in (Plain, Pergrad, PergradSecond, PergradGrads, PergradVerify, TorchFunc, Opacus, OpacusGhost,
                       OpacusGhostNorms, Backpack, BackpackVariance)
}


# --- timing ----------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(method: Method, steps: int, device: str) -> float:
    """Seconds per step over ``steps`` consecutive steps; hooks set and removed outside the timer."""
    method.enter()
    try:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            method.step()
        synchronize(device)
        return (time.perf_counter() - start) / steps
    finally:
        method.exit()


def steps_for(method: Method, target: float, device: str) -> int:
    one = min(timed(method, 1, device) for _ in range(2))
    return max(1, round(target / one))


class NoGC:
    """The garbage collector off (a collection inside a timed step would charge one method at random)."""

    def __enter__(self):
        gc.collect()
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()


class OtherLoad:
    """CPU used by other processes since creation, in cores (from /proc/stat; None where unreadable).

    Other work on the machine slows the methods unevenly; RESULTS.md reports this next to the ratios."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        return max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / (end[2] - self.start[2]))


class Quiet:
    """Before a measurement, wait while other processes keep the CPU busy (at most ``budget`` seconds
    over the whole run; 0 never waits)."""

    THRESHOLD = 0.2  # cores used by others over a one-second probe

    def __init__(self, budget: float, log: Callable[[str], None]):
        self.left, self.log = budget, log

    def busy(self, other_load: float | None) -> bool:
        """Whether a measurement during which others used ``other_load`` cores should be redone."""
        return self.left > 0 and other_load is not None and other_load >= self.THRESHOLD

    def wait(self) -> None:
        if self.left <= 0:
            return
        said = False
        while True:
            probe = OtherLoad()
            time.sleep(1.0)
            busy = probe.cores()
            if busy is None or busy < self.THRESHOLD:
                return
            self.left -= 1.0
            if self.left <= 0:
                self.log(f"  other processes still use {busy:.1f} cores; no more waiting (--wait-quiet)")
                return
            if not said:
                self.log(f"  other processes use {busy:.1f} cores; waiting for a quiet machine")
                said = True


# --- checks ----------------------------------------------------------------------------------


@dataclass
class Status:
    state: str  # ok | unsupported | wrong | not installed | not run
    reason: str = ""


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}{'…' if len(text) > 160 else ''}"


# known causes of a tool's error, found by reading its source: (method key prefix, text of the error, cause)
HINTS = [
    ("opacus", "2D attn_mask is not correct",
     "Opacus runs nn.MultiheadAttention only as its DPMultiheadAttention (ModuleValidator.fix, done here); "
     "with batch_first=True that layer checks a 2-D attn_mask against the batch size instead of the "
     "sequence length, and it refuses is_causal, so a causal mask cannot be given"),
]


def _hint(key: str, e: BaseException) -> str:
    for prefix, text, cause in HINTS:
        if key.startswith(prefix) and text in str(e):
            return f" ({cause})"
    return ""


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    """Largest elementwise |actual - expected| / |expected|."""
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()


def check(w: Workload, keys: list[str], device: str) -> tuple[dict[str, Method], dict[str, Status]]:
    """Prepare every method and run it once; compare with pergrad. Returns the usable methods."""
    ready: dict[str, Method] = {}
    status: dict[str, Status] = {}
    # pergrad's reference: norms, second moments and the batch gradient
    ref = PergradSecond(w)
    ref.keep = True
    ref.enter()
    try:
        ref.step()
    finally:
        ref.exit()
    ref_sq = ref.result.sq_norms.detach().clone()
    ref_moment = {k: v.detach().clone() for k, v in ref.result.second_moment.items()}
    ref_grad = {k: p.grad.detach().clone() for k, p in w.model.named_parameters()}
    w.model.zero_grad(set_to_none=True)
    n = w.n

    for key in keys:
        cls = METHODS[key]
        if cls.package is not None:
            try:
                importlib.metadata.version(cls.package)
            except importlib.metadata.PackageNotFoundError:
                status[key] = Status("not installed", f"pip install '.[bench]' installs {cls.package}")
                continue
        method = cls(w)
        try:
            method.prepare()
            method.enter()
            try:
                sq = method.step()
            finally:
                method.exit()
            method.validate()
        except Exception as e:  # the tool cannot run this model: say why, go on
            status[key] = Status("unsupported", _short(e) + _hint(key, e))
            continue
        if sq is not None:
            if tuple(sq.shape) != (n,):
                status[key] = Status("wrong", f"norms of shape {tuple(sq.shape)}, not ({n},)")
                continue
            err = _rel_err(sq.detach(), ref_sq)
            if not err <= RTOL:
                status[key] = Status("wrong", f"squared norms differ from pergrad's by up to {err:.1e} (relative)")
                continue
        if isinstance(method, BackpackVariance):
            # BackPACK: Var = sgs/n - (g/n)² of the scaled gradients ℓᵢ/n, i.e. (Σᵢ gᵢ²/n - ḡ²) / n²
            # relative to the parameter's largest second moment, floored at 1e-3 of the model's: a
            # parameter whose per-example gradients vanish (a key bias, under softmax) is rounding noise
            floor = 1e-3 * max((m / n).abs().max().item() for m in ref_moment.values())
            worst = 0.0
            for k, p in method.model.named_parameters():
                expected = ref_moment[k] / n - ref_grad[k].square()
                scale = max((ref_moment[k] / n).abs().max().item(), floor, 1e-30)
                worst = max(worst, ((p.variance * n * n - expected).abs().max() / scale).item())
            if not worst <= RTOL:
                status[key] = Status("wrong", f"variance differs from pergrad's second moments by {worst:.1e}")
                continue
        method.clear()
        ready[key] = method
        status[key] = Status("ok")
    return ready, status


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Timing:
    """Per method: seconds per step in each round, and ratio to plain in each round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    other_load: float | None = None  # cores used by other processes during the timed rounds


def measure(methods: dict[str, Method], rounds: int, warmup: int, target: float, device: str,
            log: Callable[[str], None]) -> Timing:
    keys = list(methods)
    steps = {k: steps_for(methods[k], target, device) for k in keys}
    for _ in range(warmup):
        for k in keys:
            timed(methods[k], steps[k], device)
    out = Timing({k: [] for k in keys}, {k: [] for k in keys if k != "plain"})
    load = OtherLoad()
    with NoGC():
        for r in range(rounds):
            order = keys[r % len(keys):] + keys[: r % len(keys)]
            this = {k: timed(methods[k], steps[k], device) for k in order}
            for k in keys:
                out.seconds[k].append(this[k])
                if k != "plain":
                    out.ratios[k].append(this[k] / this["plain"])
    out.other_load = load.cores()
    for k in keys:
        methods[k].clear()
    log("  " + ", ".join(f"{k} {statistics.median(out.seconds[k]) * 1e3:.1f} ms" for k in keys)
        + ("" if out.other_load is None else f"; other processes: {out.other_load:.2f} cores"))
    return out


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


# --- memory (one process per method) ---------------------------------------------------------


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1))


def largest_allocation(method: Method, device: str) -> int:
    """Bytes of the largest single block allocated during one more step, from the memory events of
    torch's profiler (``profile_memory=True``): every allocation of torch's CPU or CUDA allocator."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    kind = torch.device(device).type.upper()  # CPU or CUDA
    with profile(activities=activities, profile_memory=True) as prof:
        method.step()
        synchronize(device)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
             if e.name() == "[memory]" and e.device_type().name == kind]
    method.clear()
    return max(sizes, default=0)


def memory_child(workload: str, method_key: str, device: str, threads: int, largest: bool = False) -> int:
    """Peak bytes a steady-state step needs above the resting state; printed as JSON. With ``largest``,
    one more step (after the peak is read) also gives the largest single allocation."""
    torch.set_num_threads(threads)
    w = WORKLOADS[workload](device)
    method = METHODS[method_key](w)
    method.prepare()
    method.enter()
    method.step()  # first step: lazy initialisations of torch and of the tool
    method.clear()
    gc.collect()
    synchronize(device)
    cuda = device.startswith("cuda")
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    for _ in range(2):
        method.step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_kib("VmHWM") * 1024
    report = {"extra_bytes": peak - base, "base_bytes": base}
    if largest:
        method.clear()
        report["largest_allocation_bytes"] = largest_allocation(method, device)
    method.exit()
    print(json.dumps(report))
    return 0


def measure_memory(workload: str, method_key: str, device: str, threads: int, largest: bool = False,
                   details: dict | None = None) -> tuple[float | None, str]:
    """(extra bytes, error) from a fresh process; ``details`` receives everything the child reported
    (with ``largest``, also ``largest_allocation_bytes``)."""
    env = {k: v for k, v in os.environ.items() if k not in wl.STEADY_MALLOC}
    # large blocks straight from and back to the OS, so that the resident set follows what is live
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", workload, method_key,
           "--device", device, "--threads", str(threads)] + (["--largest-allocation"] if largest else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if details is not None:
        details.update(report)
    return float(report["extra_bytes"]), ""


# --- scaling ---------------------------------------------------------------------------------


def scaling(which: str, points: list[int], keys: list[str], rounds: int, target: float, max_s: float,
            device: str, log: Callable[[str], None], quiet: Quiet,
            other: dict[int, float | None]) -> dict[str, dict[int, float]]:
    """Seconds per step of each method at each point: the fastest of ``rounds`` measurements (other
    work on the machine only ever adds time). A method whose step took longer than ``max_s`` is not
    run at the larger points. ``other`` receives the cores other processes used at each point."""
    _, _, _, build = SCALING[which]
    out: dict[str, dict[int, float]] = {k: {} for k in keys}
    dropped: set[str] = set()
    for x in points:
        quiet.wait()
        w = build(x, device)
        methods: dict[str, Method] = {}
        for k in keys:
            if k in dropped:
                continue
            m = METHODS[k](w)
            try:
                m.prepare()
                m.enter()
                try:
                    m.step()
                finally:
                    m.exit()
            except Exception:
                dropped.add(k)
                continue
            methods[k] = m
        steps = {k: steps_for(m, target, device) for k, m in methods.items()}
        order = list(methods)
        for attempt in range(2):  # once more if other processes took the CPU meanwhile
            times: dict[str, list[float]] = {k: [] for k in methods}
            load = OtherLoad()
            with NoGC():
                for r in range(rounds):
                    for k in order[r % len(order):] + order[: r % len(order)]:
                        times[k].append(timed(methods[k], steps[k], device))
            other[x] = load.cores()
            if attempt or not quiet.busy(other[x]):
                break
            quiet.wait()
        for k, ts in times.items():
            out[k][x] = min(ts)
            if out[k][x] > max_s:
                dropped.add(k)
        log(f"  {which}={x}: " + ", ".join(f"{k} {out[k][x] * 1e3:.1f} ms" for k in times)
            + ("" if other[x] is None else f"; other processes: {other[x]:.2f} cores"))
        del w, methods
        gc.collect()
    return out


# --- output ----------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda p: p.write_text(text))


def environment(device: str) -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name(torch.device(device))
    else:
        hw = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                hw = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1)
        except (OSError, AttributeError):
            pass
        hw += f", {os.cpu_count()} logical cores"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": f"{device} ({hw})",
        "threads": str(torch.get_num_threads()),
        "allocator": wl.allocator_note(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pergrad": version("pergrad"),
        "opacus": version("opacus"),
        "backpack-for-pytorch": version("backpack-for-pytorch"),
        "load average at start": _load(),
    }


def _load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine slows every method alike only
    on average; a busy machine makes the ratios noisier."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def results_markdown(env: dict[str, str], settings: str, names: dict[str, str], keys: list[str],
                     status: dict[str, dict[str, Status]], timing: dict[str, Timing],
                     memory: dict[str, dict[str, tuple[float | None, str]]], has_scaling: bool,
                     scaling_load: float | None = None, largest: dict[str, dict[str, int]] | None = None) -> str:
    notes: list[str] = []
    # one note for every (workload, state, reason), naming all the methods it concerns
    groups: dict[tuple[str, str, str], list[str]] = {}
    for wk, st in status.items():
        for k, s in st.items():
            if s.state != "ok":
                groups.setdefault((wk, s.state, s.reason), []).append(k)
    group_text = {(wk, k): f"{', '.join(f'`{m}`' for m in ks)} on {names[wk]}: {state}: {reason}"
                  for (wk, state, reason), ks in groups.items() for k in ks}

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    def blocked(wk: str, k: str) -> str | None:
        s = status[wk].get(k)
        if s is None:
            return "–"
        if s.state != "ok":
            return f"{s.state} {note(group_text[(wk, k)])}"
        return None

    methods = [k for k in keys if k != "plain"]
    head = "| workload | plain ms | " + " | ".join(f"`{k}`" for k in methods) + " |"
    rule = "|---|---:|" + "---:|" * len(methods)
    lines = [
        "# Per-example gradient norms: pergrad against torch.func, Opacus and BackPACK",
        "",
        "Written by `benchmarks/run.py` (see `benchmarks/README.md` for what is measured and how). "
        "Compare ratios measured in the same run, not wall times across machines.",
        "",
        "## Environment",
        "",
        *(f"- **{k}**: {v}" for k, v in env.items()),
        f"- **settings**: {settings}",
        "",
        "## Step time, as a multiple of the plain step",
        "",
        "Median over rounds of (method step time / plain step time in the same round); `plain ms` is the "
        "median plain step. Every number is a full step: zero grads, forward, backward, per-example norms (n,).",
        "",
        head,
        rule,
    ]
    for wk, t in timing.items():
        row = [names[wk], f"{statistics.median(t.seconds['plain']) * 1e3:.2f}"]
        for k in methods:
            b = blocked(wk, k)
            row.append(b if b is not None else f"{statistics.median(t.ratios[k]):.2f}×")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Interquartile range of the ratio over rounds, and the CPU that other processes used while "
              "the rounds ran (in cores; near 0 on a quiet machine):", "",
              head.replace("| plain ms |", "| rounds | other load |"), rule.replace("|---:|", "|---:|---:|", 1)]
    for wk, t in timing.items():
        row = [names[wk], str(len(t.seconds["plain"])),
               "?" if t.other_load is None else f"{t.other_load:.2f}"]
        for k in methods:
            if blocked(wk, k) is not None:
                row.append("")
            else:
                q1, _, q3 = quartiles(t.ratios[k])
                row.append(f"{q1:.2f}–{q3:.2f}")
        lines.append("| " + " | ".join(row) + " |")

    if memory:
        lines += [
            "",
            "## Peak memory of a step",
            "",
            "`plain MB`: peak memory a plain step needs above the resting state (model, data, no gradients); "
            "other columns: what the method needs on top of that, in MB. Each measured in a fresh process.",
            "",
            "| workload | plain MB | " + " | ".join(f"`{k}`" for k in methods) + " |",
            rule,
        ]
        mb = 2.0 ** 20
        for wk, row_mem in memory.items():
            plain, err = row_mem.get("plain", (None, "not measured"))
            row = [names[wk], f"{plain / mb:.1f}" if plain is not None else f"? {note(err)}"]
            for k in methods:
                b = blocked(wk, k)
                if b is not None:
                    row.append(b)
                    continue
                if k not in row_mem:
                    row.append("–")
                    continue
                extra, err = row_mem[k]
                if extra is None or plain is None:
                    row.append(f"? {note(f'memory of {k} on {names[wk]}: {err}')}")
                else:
                    row.append(f"{(extra - plain) / mb:+.1f}")
            lines.append("| " + " | ".join(row) + " |")
    if largest and any(largest.values()):
        lines += [
            "",
            "Largest single allocation of a step (`--largest-allocation`: one more step under torch's profiler), "
            "in MB:",
            "",
            "| workload | " + " | ".join(f"`{k}`" for k in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for wk, d in largest.items():
            if d:
                lines.append("| " + " | ".join([names[wk]] + [f"{d[k] / 2**20:.1f}" if k in d else "–" for k in keys])
                             + " |")

    lines += ["", "## Figures", "", "![step time ratio](results.png)", ""]
    if has_scaling:
        lines += ["![time per step against n and t](scaling.png)", "",
                  "Scaling: each point is the fastest of 3 measurements (a measurement averages consecutive "
                  "steps); a method is dropped at the larger sizes once a step takes over 1.5 s."
                  + ("" if scaling_load is None else
                     f" Other processes used at most {scaling_load:.2f} cores while a point was measured."), ""]
    if notes:
        lines += ["## Notes", ""] + [f"{i + 1}. {text}" for i, text in enumerate(notes)] + [""]
    return "\n".join(lines)


def _color(key: str):
    """The same colour for a method in both figures; the plain step in black."""
    import matplotlib.pyplot as plt

    if key == "plain":
        return "black"
    others = [k for k in METHODS if k != "plain"]
    return plt.get_cmap("tab10")(others.index(key) % 10)


def plot_results(path: Path, names: dict[str, str], keys: list[str], status: dict[str, dict[str, Status]],
                 timing: dict[str, Timing], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in keys if k != "plain"]
    wks = list(timing)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.9 * len(wks) + 2), 5.2))
    width = 0.8 / max(1, len(methods))
    top = 1.0
    for j, k in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, wk in enumerate(wks):
            x = i - 0.4 + width * (j + 0.5)
            s = status[wk].get(k)
            if s is None:
                continue
            if s.state != "ok":
                ax.text(x, 1.0, "×" if s.state == "unsupported" else "!", ha="center", va="bottom",
                        color=_color(k), fontsize=9, fontweight="bold")
                continue
            q1, q2, q3 = quartiles(timing[wk].ratios[k])
            xs.append(x), ys.append(q2), lo.append(q2 - q1), hi.append(q3 - q2)
            top = max(top, q3)
        ax.bar(xs, ys, width, bottom=0, label=k, color=_color(k), yerr=[lo, hi], capsize=2,
               error_kw={"linewidth": 0.8})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(0.5, top * 1.6)
    ax.set_xticks(range(len(wks)))
    ax.set_xticklabels([names[wk].replace(", ", "\n") for wk in wks], fontsize=8)
    ax.set_ylabel("step time / plain step time (log)")
    ax.set_title(title + "\n× unsupported, ! wrong; bars: median, whiskers: interquartile range", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    _write_atomic(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def plot_scaling(path: Path, results: dict[str, dict[str, dict[int, float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, (which, per_method) in zip(axes[0], results.items()):
        for k, pts in per_method.items():
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[x] * 1e3 for x in xs], marker="o", label=k, color=_color(k))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(SCALING[which][0])
        ax.set_ylabel("ms per step (log)")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _write_atomic(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 small workloads, 3 rounds, short measurements, 2-point scaling, "
                             "memory of plain and pergrad on the MLP only; written to a temporary folder unless --out")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), metavar="W",
                        help=f"workloads to run (default: all but {', '.join(sorted(OPT_IN_WORKLOADS))}, which "
                             f"run only when named): {', '.join(WORKLOADS)}")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="M",
                        help=f"methods to run (default: all; plain always): {', '.join(METHODS)}")
    parser.add_argument("--rounds", type=int, help="timed rounds per workload (default 15; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2; quick 1)")
    parser.add_argument("--target-ms", type=float,
                        help="about how long one measurement lasts (default 60; quick 15)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for RESULTS.md, results.png, scaling.png, results.json "
                             "(default: benchmarks/; quick: a temporary folder)")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="SECONDS",
                        help="before each measurement, wait while other processes keep the CPU busy, at most "
                             "this long over the whole run (default 300; quick 0: never wait)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--largest-allocation", action="store_true",
                        help="also measure the largest single allocation of a step (one more step per memory "
                             "process, under torch's profiler)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling plot")
    parser.add_argument("--system-malloc", action="store_true",
                        help="time under the system's malloc defaults (default: restart with freed memory kept "
                             "for reuse, see workloads.STEADY_MALLOC)")
    parser.add_argument("--memory-child", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.memory_child:
        wl.steady_allocator(args.system_malloc)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(*args.memory_child, device, args.threads, args.largest_allocation)

    quick = args.quick
    rounds = args.rounds or (3 if quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    target = (args.target_ms or (15.0 if quick else 60.0)) / 1e3
    wks = args.workloads or (QUICK_WORKLOADS if quick else _default_workloads())
    keys = ["plain"] + [k for k in METHODS if k != "plain" and (not args.methods or k in args.methods)]
    out = args.out or (Path(tempfile.gettempdir()) / "pergrad-bench-quick" if quick else HERE)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    env = environment(device)
    log(f"torch {env['torch']} on {env['device']}, {env['threads']} threads; opacus {env['opacus']}, "
        f"backpack {env['backpack-for-pytorch']}")

    quiet = Quiet(args.wait_quiet if args.wait_quiet is not None else (0.0 if quick else 300.0), log)
    names: dict[str, str] = {}
    status: dict[str, dict[str, Status]] = {}
    timing: dict[str, Timing] = {}
    for wk in wks:
        w = WORKLOADS[wk](device)
        names[wk] = w.name
        ready, status[wk] = check(w, keys, device)
        for k, s in status[wk].items():
            if s.state != "ok":
                log(f"{w.name}: {k} {s.state}: {s.reason}")
        log(f"{w.name}: checked; timing {len(ready)} methods")
        for attempt in range(3):  # redo the rounds if other processes took the CPU meanwhile
            quiet.wait()
            timing[wk] = measure(ready, rounds, warmup, target, device, log)
            if not quiet.busy(timing[wk].other_load):
                break
            log(f"  other processes used {timing[wk].other_load:.2f} cores during the rounds; measuring again")
        del w, ready
        gc.collect()

    memory: dict[str, dict[str, tuple[float | None, str]]] = {}
    largest: dict[str, dict[str, int]] = {}  # with --largest-allocation: bytes of the largest single block
    if not args.no_memory:
        for wk in (wks[:1] if quick else wks):
            memory[wk], largest[wk] = {}, {}
            for k in keys:
                if status[wk][k].state == "ok" and (not quick or k in ("plain", "pergrad")):
                    details: dict = {}
                    memory[wk][k] = measure_memory(wk, k, device, args.threads, args.largest_allocation, details)
                    if "largest_allocation_bytes" in details:
                        largest[wk][k] = details["largest_allocation_bytes"]
            plain = memory[wk]["plain"][0]
            log(f"memory {names[wk]}: " + ", ".join(
                f"{k} {v / 2**20:.1f} MB" if v is not None else f"{k} failed ({e})"
                for k, (v, e) in memory[wk].items()) + ("" if plain is None else " (peak above rest)"))
            if largest[wk]:
                log(f"largest single allocation {names[wk]}: "
                    + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in largest[wk].items()))

    scaled: dict[str, dict[str, dict[int, float]]] = {}
    scaled_other: dict[str, dict[int, float | None]] = {}
    if not args.no_scaling:
        skeys = [k for k in SCALING_METHODS if k in keys]
        for which, (_, points, quick_points, _) in SCALING.items():
            log(f"scaling in {which}")
            scaled_other[which] = {}
            scaled[which] = scaling(which, quick_points if quick else points, skeys, 2 if quick else 3,
                                    target, 0.3 if quick else 1.5, device, log, quiet, scaled_other[which])

    settings = (f"float32, median of {rounds} rounds after {warmup} warm-up rounds, one measurement ≈ "
                f"{target * 1e3:g} ms of consecutive steps, tolerance of the norm check {RTOL:g} (relative)")
    title = f"torch {env['torch']}, {env['device']}, {env['threads']} threads"
    env["load average at end"] = _load()
    out.mkdir(parents=True, exist_ok=True)
    plot_results(out / "results.png", names, keys, status, timing, title)
    if scaled:
        plot_scaling(out / "scaling.png", scaled, title)
    write_text(out / "RESULTS.md",
               results_markdown(env, settings, names, keys, status, timing, memory, bool(scaled),
                                max((v for d in scaled_other.values() for v in d.values() if v is not None),
                                    default=None), largest))
    raw = {
        "environment": env, "settings": settings, "workloads": names,
        "status": {wk: {k: vars(s) for k, s in st.items()} for wk, st in status.items()},
        "seconds": {wk: t.seconds for wk, t in timing.items()},
        "ratios": {wk: t.ratios for wk, t in timing.items()},
        "memory_extra_bytes": {wk: {k: v for k, (v, _) in m.items()} for wk, m in memory.items()},
        "memory_largest_allocation_bytes": {wk: d for wk, d in largest.items() if d},
        "scaling_seconds": scaled,
        "other_load_cores": {wk: t.other_load for wk, t in timing.items()},
        "scaling_other_load_cores": scaled_other,
    }
    write_text(out / "results.json", json.dumps(raw, indent=1) + "\n")
    log(f"wrote {out / 'RESULTS.md'}, results.png, {'scaling.png, ' if scaled else ''}results.json")
    print()
    print(results_markdown(env, settings, names, keys, status, timing, {}, False).split("## Figures")[0].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
