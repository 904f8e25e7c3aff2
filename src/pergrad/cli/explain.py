"""``pergrad explain``: a mini-batch gradient is the average of the per-example gradients.

On a 5-parameter linear regression it prints each example's loss and gradient, their average,
and the gradient autograd gives for the mean loss, which agree to rounding. It then draws the
same idea for a 2-parameter line ``y ≈ w·x + b``: each example's descent direction, their average
and the full-data one, on the loss surface over ``(w, b)``, saved as ``DIR/explain.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor, nn

import pergrad
from pergrad._atomic import savefig_atomic

N_EXAMPLES = 64
MIN_BATCH, MAX_BATCH = 2, 4
DATA_SEED = 0
W_TRUE = (1.0, -2.0, 0.5, 3.0)  # the 4-feature data: y = x·w* + noise, no intercept
LINE_TRUE = (2.0, -1.0)  # the picture's data: y = w*·x + b* + noise, as (w*, b*)
LINE_THETA = (0.0, 2.5)  # the picture's point θ = (w, b) where gradients are taken
NOISE = 0.5
_COLORS = {"example": "#f28e2b", "average": "#d62728", "full": "black"}


@dataclass
class BatchGradients:
    """Per-example and mini-batch gradients of one model at one point, parameters flattened.

    Attributes:
        labels: one per scalar parameter (p of them), e.g. ``weight[2]``, in the order of
            ``model.named_parameters()``.
        losses: (n,) each example's loss ``ℓᵢ``.
        per_example: (n, p) ``∇ℓᵢ``, the gradient of example i's own loss.
        autograd: (p,) ``p.grad`` after one backward of the mean loss ``(1/n) Σᵢ ℓᵢ``.
    """

    labels: list[str]
    losses: Tensor
    per_example: Tensor
    autograd: Tensor


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand and its options; return its parser."""
    parser = subparsers.add_parser(
        "explain",
        help="show that a mini-batch gradient is the average of per-example gradients",
        description="Print a worked example showing that a mini-batch gradient is the average "
        "of the per-example gradients, and draw it on a loss surface as DIR/explain.png.",
    )
    parser.add_argument(
        "--examples",
        type=_batch_size,
        default=3,
        metavar="K",
        help=f"mini-batch size, {MIN_BATCH} to {MAX_BATCH} (default: 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed that draws the mini-batch (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/explain"),
        metavar="DIR",
        help="directory for explain.png, created if missing (default: runs/explain)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the worked example, write ``args.out/explain.png``; return the exit code."""
    problem = _prepare_out_dir(args.out)
    if problem:
        return _error(problem)
    index = torch.randperm(N_EXAMPLES, generator=torch.Generator().manual_seed(args.seed))
    index = index[: args.examples]

    x, y = regression_data(W_TRUE, 0.0, x_mean=0.0)
    model = _linear(torch.zeros(len(W_TRUE)), 0.0)
    batch = batch_gradients(model, x[index], y[index])
    print(format_report(batch, index, args.seed))

    figure = draw_picture(index)
    png = args.out / "explain.png"
    try:
        savefig_atomic(figure, png, dpi=150)
    except OSError as err:
        return _error(f"cannot write {png} ({err.strerror}); pass a writable directory to --out")
    print(f"\npicture: {png}")
    return 0


def regression_data(w_true: tuple[float, ...], b_true: float, x_mean: float) -> tuple[Tensor, Tensor]:
    """The fixed synthetic dataset ``y = x·w* + b* + noise``, in float64.

    Args:
        w_true: (d,) the true weights w*.
        b_true: the true intercept b*.
        x_mean: every feature is drawn from N(x_mean, 1).

    Returns:
        x: (N, d) inputs, N = ``N_EXAMPLES``.
        y: (N,) targets, with Gaussian noise of standard deviation ``NOISE``.
    """
    generator = torch.Generator().manual_seed(DATA_SEED)
    w = torch.tensor(w_true, dtype=torch.float64)
    x = x_mean + torch.randn(N_EXAMPLES, len(w), generator=generator, dtype=torch.float64)
    noise = NOISE * torch.randn(N_EXAMPLES, generator=generator, dtype=torch.float64)
    return x, x @ w + b_true + noise


def squared_error(out: Tensor, y: Tensor) -> Tensor:
    """Per-example loss ``ℓᵢ = ½ (f(xᵢ) − yᵢ)²``, (n,), of outputs out (n, 1) and targets y (n,)."""
    return 0.5 * (out.squeeze(1) - y).square()


def batch_gradients(model: nn.Module, x: Tensor, y: Tensor) -> BatchGradients:
    """Per-example gradients with ``pergrad.PerExample`` and ``p.grad`` of the mean loss.

    Args:
        model: maps x (n, d) to (n, 1); its ``.grad`` fields are overwritten.
        x: (n, d) inputs.
        y: (n,) targets.

    Returns:
        The n losses and gradients, with reduction ``"mean"`` for ``autograd``.
    """
    model.zero_grad(set_to_none=True)
    with pergrad.PerExample(model, grads=True) as pe:
        losses = squared_error(model(x), y)
        result = pe.backward(losses, reduction="mean")
    named = list(model.named_parameters())
    return BatchGradients(
        labels=[label for name, p in named for label in _scalar_labels(name, p)],
        losses=losses.detach(),
        per_example=torch.cat([result.grads[name].reshape(len(y), -1) for name, _ in named], 1),
        autograd=torch.cat([p.grad.reshape(-1) for _, p in named]),
    )


def format_report(batch: BatchGradients, index: Tensor, seed: int) -> str:
    """The terminal text: the table of gradients and what it shows.

    Args:
        batch: the mini-batch's gradients.
        index: (B,) the dataset positions of the mini-batch examples.
        seed: the ``--seed`` that drew them, to show how to reproduce the draw.
    """
    n_batch, n_params = batch.per_example.shape
    average = batch.per_example.mean(0)
    max_diff = (average - batch.autograd).abs().max().item()
    label_width, col = 16, 10

    def row(label: str, loss: str, values: Tensor) -> str:
        cells = "".join(f"{v:>+{col}.5f}" for v in values.tolist())
        return f"{label:<{label_width}}{loss:>{col}}{cells}"

    header = f"{'':<{label_width}}" + "".join(f"{s:>{col}}" for s in ["loss ℓᵢ", *batch.labels])
    rule = "─" * len(header)
    lines = [
        "pergrad explain: a mini-batch gradient is the average of per-example gradients",
        "",
        f"model  f(x) = weight·x + bias, nn.Linear({len(W_TRUE)}, 1): {n_params} parameters, float64, all zero",
        f"data   {N_EXAMPLES} examples, x ~ N(0, I), y = x·w* + noise;  loss per example ℓᵢ = ½ (f(xᵢ) − yᵢ)²",
        f"batch  B = {n_batch} examples drawn at random (--seed {seed})",
        "",
        header,
        rule,
        *(
            row(f"∇ℓ  example #{i}", f"{loss:.5f}", grad)
            for i, loss, grad in zip(index.tolist(), batch.losses.tolist(), batch.per_example, strict=True)
        ),
        rule,
        row("(1/B) Σ ∇ℓᵢ", f"{batch.losses.mean().item():.5f}", average),
        row("∇ (1/B) Σ ℓᵢ", "", batch.autograd),
        "",
        "(1/B) Σ ∇ℓᵢ   average of the per-example gradients above (pergrad.PerExample)",
        "∇ (1/B) Σ ℓᵢ   p.grad after one ordinary backward of the mean loss",
        f"max |difference| = {max_diff:.1e}",
        "",
        "Why they agree: the gradient of an average is the average of the gradients,",
        "    ∇ (1/B) Σ ℓᵢ  =  (1/B) Σ ∇ℓᵢ.",
        "And because the B examples are drawn at random, this mini-batch average is an",
        f"unbiased estimate of the full-data gradient over all {N_EXAMPLES} examples: right on",
        "average over draws, noisy for any single one.",
    ]
    return "\n".join(lines)


def draw_picture(index: Tensor) -> Figure:
    """The loss surface of a line ``y ≈ w·x + b`` over (w, b), with the gradients at θ.

    Descent directions (negative gradients) start at ``LINE_THETA``: one per mini-batch
    example, their average, and the full-data one, all scaled by one factor so they fit.

    Args:
        index: (B,) the dataset positions of the mini-batch examples.
    """
    x, y = regression_data(LINE_TRUE[:1], LINE_TRUE[1], x_mean=1.0)
    model = _linear(torch.tensor(LINE_THETA[:1]), LINE_THETA[1])
    batch = batch_gradients(model, x[index], y[index])
    full = batch_gradients(model, x, y).autograd
    # (B + 2, 2): each example's descent direction, then the mini-batch average, then full data.
    steps = -torch.cat([batch.per_example, batch.per_example.mean(0, keepdim=True), full[None]])

    theta = np.array(LINE_THETA)
    optimum = _line_fit(x.squeeze(1), y)
    half = 0.75 * np.abs(theta - optimum).max() + 1.0  # a square view around θ and the optimum
    lo, hi = (theta + optimum) / 2 - half, (theta + optimum) / 2 + half

    fig = Figure(figsize=(7.2, 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw_surface(ax, x.squeeze(1).numpy(), y.numpy(), lo, hi)
    margin = 0.08 * half
    scale = _arrow_scale(theta, steps.numpy(), lo + margin, hi - margin)
    _draw_arrows(ax, theta, scale * steps.numpy())
    ax.plot(*optimum, "*", color="white", markeredgecolor="black", markersize=15, zorder=5)
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal")
    ax.set(xlabel="weight w", ylabel="bias b")
    ax.set_title(
        "A mini-batch gradient is the average of per-example gradients\n"
        f"line y ≈ w·x + b on N = {N_EXAMPLES} points; descent directions at θ, "
        f"drawn at {scale:.2g} × length",
        fontsize=10.5,
    )
    ax.legend(
        handles=_legend_handles(len(index)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=2,
        fontsize=9,
    )
    return fig


def _draw_surface(ax: Axes, x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Filled contours of the mean loss over the (w, b) box [lo, hi], levels spaced in log.

    Args:
        ax: where to draw; a colour bar is added next to it.
        x: (N,) inputs.
        y: (N,) targets.
        lo, hi: (2,) the box's corners, as (w, b).
    """
    w, b = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    loss = 0.5 * np.mean((w[..., None] * x + b[..., None] - y) ** 2, axis=-1)  # (300, 300)
    levels = np.geomspace(loss.min(), loss.max(), 24)
    filled = ax.contourf(w, b, loss, levels=levels, norm=LogNorm(), cmap="Blues_r")
    ax.contour(w, b, loss, levels=levels, colors="white", linewidths=0.3, alpha=0.6)
    ax.figure.colorbar(filled, ax=ax, label="mean loss L(w, b) over all examples (log scale)", format="{x:.2g}")


def _draw_arrows(ax: Axes, theta: np.ndarray, steps: np.ndarray) -> None:
    """Arrows from θ (2,) by steps (B + 2, 2): examples (thin), then average and full (thick).

    The thin arrows are drawn last, so that a short one stays visible on top of a thick one.
    """
    _arrow(ax, theta, theta + steps[-1], _COLORS["full"], width=3.0)
    _arrow(ax, theta, theta + steps[-2], _COLORS["average"], width=3.0)
    for step in steps[:-2]:
        _arrow(ax, theta, theta + step, _COLORS["example"], width=1.2)
    ax.plot(*theta, "o", color="black", markersize=6, zorder=5)
    ax.annotate("θ", theta, xytext=(-12, 6), textcoords="offset points", fontsize=13)


def _arrow(ax: Axes, start: np.ndarray, end: np.ndarray, color: str, width: float) -> None:
    """One arrow from start (2,) to end (2,) in data coordinates."""
    style = dict(arrowstyle="-|>", color=color, lw=width, mutation_scale=8 + 4 * width)
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(style, shrinkA=0, shrinkB=0))


def _legend_handles(n_batch: int) -> list[Line2D]:
    """Legend entries for the arrows and markers of :func:`draw_picture`."""
    lines = {
        f"−∇ℓᵢ, each of the B = {n_batch} examples": dict(color=_COLORS["example"], lw=1.2),
        "−(1/B) Σ ∇ℓᵢ, mini-batch average": dict(color=_COLORS["average"], lw=3.0),
        f"−∇L, full data (N = {N_EXAMPLES})": dict(color=_COLORS["full"], lw=3.0),
        "θ, where gradients are taken": dict(ls="", marker="o", color="black"),
        "minimum of L": dict(ls="", marker="*", markersize=12, color="white", mec="black"),
    }
    return [Line2D([], [], label=label, **style) for label, style in lines.items()]


def _arrow_scale(start: np.ndarray, steps: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """The largest factor s with every tip ``start + s·step`` inside the box [lo, hi].

    Args:
        start: (2,) where every arrow starts, inside the box.
        steps: (m, 2) the arrows before scaling.
        lo, hi: (2,) the box's corners.
    """
    room = np.where(steps > 0, hi - start, start - lo)  # (m, 2) room in each arrow's direction
    with np.errstate(divide="ignore"):
        return float(np.min(room / np.abs(steps)))


def _line_fit(x: Tensor, y: Tensor) -> np.ndarray:
    """The minimum (w, b) of the mean loss ``½ mean((w·x + b − y)²)`` over x (N,), y (N,):
    ``w = cov(x, y) / var(x)``, ``b = ȳ − w·x̄``.

    In closed form rather than by a least-squares solver, whose LAPACK routine may round
    differently from run to run when the machine is busy; the picture must not.
    """
    dx, dy = x - x.mean(), y - y.mean()
    w = (dx * dy).sum() / dx.square().sum()
    return np.array([w.item(), (y.mean() - w * x.mean()).item()])


def _linear(weight: Tensor, bias: float) -> nn.Linear:
    """``nn.Linear(d, 1)`` in float64 with the given weight (d,) and bias."""
    model = nn.Linear(len(weight), 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(weight.reshape(1, -1))
        model.bias.fill_(bias)
    return model


def _scalar_labels(name: str, p: Tensor) -> list[str]:
    """Column labels for the entries of parameter ``name``, size-1 dimensions dropped."""
    shape = [s for s in p.shape if s != 1]
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def _batch_size(text: str) -> int:
    """Parse ``--examples``; tell the user the allowed range if it is outside."""
    try:
        k = int(text)
    except ValueError:
        k = None
    if k is None or not MIN_BATCH <= k <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be a whole number from {MIN_BATCH} to {MAX_BATCH}, got '{text}'")
    return k


def _prepare_out_dir(out_dir: Path) -> str | None:
    """Create ``out_dir`` if missing; return what is wrong with it, or None if it is usable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create --out directory '{out_dir}' ({err.strerror}); pass a directory you can write to"
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return f"--out directory '{out_dir}' is not writable; pass a directory you can write to"
    return None


def _error(message: str) -> int:
    """Print a one-line error for ``pergrad explain`` to stderr; return exit code 2."""
    print(f"pergrad explain: error: {message}", file=sys.stderr)
    return 2
