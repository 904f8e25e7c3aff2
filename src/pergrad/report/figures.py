"""The report's figures, each drawn on its own matplotlib Figure and returned as PNG bytes.

No pyplot: figures are built with ``Figure`` and the Agg canvas, so building a report in a
process never touches a global figure manager or opens a window.
"""

from __future__ import annotations

import contextlib
import io
import math

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave

from ..stats.batch import noise_coefficient
from ..train.metrics import Column
from .advice import BatchSizeAdvice
from .run_files import Metrics
from .unbiasedness import UnbiasednessCheck

__all__ = [
    "style",
    "png_bytes",
    "curves_figure",
    "noise_scale_figure",
    "snr_figure",
    "norms_figure",
    "unbiasedness_figure",
    "assumptions_figure",
    "thumbnail_png",
    "MAX_SNR_LINES",
]

TRAIN, VAL, ACCENT, GREY = "#1f6fb2", "#e8590c", "#2f9e44", "#868e96"
PRECOND = "#7048e8"  # B_P, the noise scale in the preconditioner's metric
MAX_SNR_LINES = 12  # more parameters than this: the SNR figure shows only the last values
_DPI = 130
_STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.labelsize": 9.5,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.edgecolor": "#868e96",
}


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    return buffer.getvalue()


def style() -> contextlib.AbstractContextManager:
    """The report's matplotlib settings (font sizes); draw every figure inside it."""
    return matplotlib.rc_context(_STYLE)


def _figure(ncols: int, height: float = 3.3, width: float = 9.6, width_ratios=None) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, ncols, width_ratios=width_ratios)
    axes = [fig.add_subplot(grid[0, k]) for k in range(ncols)]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e9ecef", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, axes


def _log_if_spread(ax: Axes, values: np.ndarray, axis: str = "y", spread: float = 30.0) -> None:
    """Log scale when the positive finite values span more than ``spread``."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() > spread:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def curves_figure(metrics: Metrics) -> Figure:
    """Loss (and accuracy, for classification) over training: train windows and validation."""
    steps = metrics.column(Column.STEP)
    with_accuracy = metrics.has(Column.ACCURACY) or metrics.has(Column.VAL_ACCURACY)
    fig, axes = _figure(2 if with_accuracy else 1)
    panels = [(Column.LOSS, Column.VAL_LOSS, "loss")]
    if with_accuracy:
        panels.append((Column.ACCURACY, Column.VAL_ACCURACY, "accuracy"))
    for ax, (train, val, label) in zip(axes, panels, strict=True):
        for name, color, text, style in (
            (train, TRAIN, "training (mean over each log window)", dict(lw=1.8)),
            (val, VAL, "validation", dict(lw=1.6, marker="o", markersize=3)),
        ):
            values = metrics.column(name)
            ok = np.isfinite(values)
            if ok.any():
                ax.plot(steps[ok], values[ok], color=color, label=text, **style)
        if label == "loss":
            _log_if_spread(ax, np.concatenate([metrics.column(train), metrics.column(val)]), spread=10)
        else:
            ax.set_ylim(top=1.0)
        ax.set(xlabel="step", ylabel=label, title=f"{label.capitalize()} over training")
        ax.legend(frameon=False)
    return fig


def noise_scale_figure(
    metrics: Metrics, advice: BatchSizeAdvice, batch_sizes: list[tuple[int, int]] | None = None
) -> Figure:
    """B_simple with its interval over training, the batch size, and the steps the advice read;
    dotted, the two-batch estimate of B_simple when the run logged one (several workers or
    micro-batches). ``batch_sizes``: the (first step, B) of each batch size of an ``auto`` run,
    drawn as steps with a dot at each change; None for a fixed B."""
    steps = metrics.column(Column.STEP)
    columns = [Column.B_SIMPLE, Column.B_SIMPLE_LOW, Column.B_SIMPLE_HIGH]
    b, low, high = (metrics.column(c) for c in columns)
    fig, (ax,) = _figure(1, height=3.6)
    if metrics.has(Column.B_PRECOND):
        columns += [Column.B_PRECOND, Column.B_PRECOND_LOW, Column.B_PRECOND_HIGH]
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in (metrics.column(c) for c in columns)])
    finite = np.append(finite, [size for _, size in batch_sizes or [(0, advice.batch_size)]])
    top = finite.max() * 3
    bottom = finite.min() / 3
    band_low = np.where(np.isfinite(low) & (low > 0), low, np.where(np.isnan(low), np.nan, bottom))
    band_high = np.where(np.isinf(high), top, high)
    kept = ~np.isnan(b)  # rows with a value: with measure_every, rows between measurements have none
    ax.fill_between(steps[kept], band_low[kept], band_high[kept], color=TRAIN, alpha=0.15, lw=0, label="95% interval")
    shown = np.where(np.isinf(b), np.nan, b)
    ax.plot(steps[kept], shown[kept], color=TRAIN, lw=1.8, label="B_simple = tr Σ / |G|²")
    if metrics.has(Column.B_PRECOND):
        b_p, low_p, high_p = (
            metrics.column(c) for c in (Column.B_PRECOND, Column.B_PRECOND_LOW, Column.B_PRECOND_HIGH)
        )
        kept_p = ~np.isnan(b_p)
        ax.fill_between(steps[kept_p], np.where(np.isfinite(low_p) & (low_p > 0), low_p, bottom)[kept_p],
                        np.where(np.isinf(high_p), top, high_p)[kept_p], color=PRECOND, alpha=0.12, lw=0)  # fmt: skip
        ax.plot(steps[kept_p], np.where(np.isfinite(b_p), b_p, np.nan)[kept_p], color=PRECOND, lw=1.8,
                label="B_P = tr(PΣ) / GᵀPG (Adam's metric P)")  # fmt: skip
    if metrics.has(Column.B_SIMPLE_TWO_BATCH):
        two = metrics.column(Column.B_SIMPLE_TWO_BATCH)
        shown_two = np.where(np.isfinite(two) & (two > 0), np.clip(two, bottom, top), np.nan)
        ax.plot(steps[kept], shown_two[kept], color=GREY, lw=1.4, ls=":",
                label="B_simple, two-batch (micro-batch vs. global batch)")  # fmt: skip
    unbounded = np.isinf(b)
    if unbounded.any():
        ax.plot(steps[unbounded], np.full(unbounded.sum(), top / 1.15), "^", color=TRAIN,
                markersize=5, label="B_simple = ∞ (|G|² estimate ≤ 0)")  # fmt: skip
    if batch_sizes is None:
        ax.axhline(advice.batch_size, color=VAL, lw=1.6, ls="--", label=f"batch size B = {advice.batch_size}")
    else:
        starts, sizes = zip(*batch_sizes, strict=True)
        ax.step([*starts, steps[-1]], [*sizes, sizes[-1]], where="post", color=VAL, lw=1.6, ls="--",
                label=f"batch size B (auto, {len(sizes) - 1} changes)")  # fmt: skip
        if len(sizes) > 1:
            ax.plot(starts[1:], sizes[1:], "o", color=VAL, markersize=4, label="a change of B")
    if advice.n_values:
        ax.axvspan(advice.first_step, advice.last_step, color=GREY, alpha=0.12, lw=0,
                   label="steps the advice reads")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    title = "Noise scales B_simple, B_P" if metrics.has(Column.B_PRECOND) else "Gradient noise scale B_simple"
    ax.set(xlabel="step", ylabel="examples", title=f"{title} and the batch size")
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def snr_figure(metrics: Metrics, batch_size: int) -> Figure:
    """Each parameter's SNR: the last logged value (bars), and over training if few enough;
    a dashed line at 1/B, where a batch of B examples has SNR 1."""
    names = metrics.snr_names
    last = np.array([_last_finite(metrics.column(Column.snr(n))) for n in names])
    lines = len(names) <= MAX_SNR_LINES
    height = max(3.0, 0.75 + 0.24 * len(names))
    fig, axes = _figure(2 if lines else 1, height=height, width_ratios=[1.15, 1.0] if lines else None)
    colors = [_cycle(k) for k in range(len(names))]
    if lines:
        ax = axes[0]
        steps = metrics.column(Column.STEP)
        for name, color in zip(names, colors, strict=True):
            values = metrics.column(Column.snr(name))
            ok = np.isfinite(values) & (values > 0)
            ax.plot(steps[ok], values[ok], color=color, lw=1.4, label=name)
        ax.axhline(1 / batch_size, color=GREY, lw=1.2, ls="--")
        ax.annotate("1/B", (1.0, 1 / batch_size), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", va="center", fontsize=8, color=GREY)  # fmt: skip
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="SNR", title="SNR per parameter over training")
    bars = axes[-1]
    y = np.arange(len(names))
    shown = np.where(np.isfinite(last) & (last > 0), last, np.nan)
    bars.barh(y, shown, color=colors, height=0.7)
    bars.set_yticks(y, names, fontsize=8)
    bars.invert_yaxis()
    bars.axvline(1 / batch_size, color=GREY, lw=1.2, ls="--")
    bars.annotate(f"1/B = 1/{batch_size}", (1 / batch_size, 1.0), xycoords=("data", "axes fraction"),
                  xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8, color=GREY)  # fmt: skip
    _log_if_spread(bars, np.append(shown, 1 / batch_size), axis="x", spread=20)
    bars.set_xlabel("SNR (last logged value)")
    bars.set_title("Last logged SNR per parameter", pad=14)
    bars.grid(False, axis="y")
    return fig


def norms_figure(norms: np.ndarray, quantiles: dict[str, float], logged: dict[str, float]) -> Figure:
    """Histogram of the per-example gradient norms at θ, with their quantiles marked.

    Args:
        norms: (N,) ‖∇ℓᵢ‖ at θ.
        quantiles: label ("q10", "q50", "q90") -> value, drawn as vertical lines.
        logged: the same labels -> the trainer's last logged values (dotted), may be empty.
    """
    fig, (ax,) = _figure(1, height=3.3)
    positive = norms[norms > 0]
    log = positive.size > 1 and positive.max() / positive.min() > 30
    if log:
        bins = np.geomspace(positive.min(), positive.max(), 50)
        ax.set_xscale("log")
    else:
        bins = 50
    ax.hist(positive if log else norms, bins=bins, color=TRAIN, alpha=0.8, edgecolor="white", lw=0.4)
    for (label, value), color in zip(quantiles.items(), (ACCENT, VAL, "#7048e8"), strict=False):
        ax.axvline(value, color=color, lw=1.6, label=f"{label} at θ = {value:.3g}")
        if label in logged and logged[label] is not None and math.isfinite(logged[label]):
            ax.axvline(logged[label], color=color, lw=1.2, ls=":",
                       label=f"{label}, last training window = {logged[label]:.3g}")  # fmt: skip
    ax.set(xlabel="per-example gradient norm ‖∇ℓᵢ‖", ylabel="training examples",
           title="Per-example gradient norms at the saved parameters")  # fmt: skip
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def unbiasedness_figure(check: UnbiasednessCheck, run_batch_size: int) -> Figure:
    """Left: E‖ḡ_B − ∇C‖² measured vs predicted. Right: the mean of k batches against ∇C."""
    fig, (left, right) = _figure(2, height=3.6)
    b = np.array([r.batch_size for r in check.rows], dtype=float)
    measured = np.array([r.measured for r in check.rows])
    error = np.array([2 * r.std_error for r in check.rows])
    predicted = np.array([r.predicted for r in check.rows])
    fine = np.geomspace(b.min(), b.max(), 200)
    n = check.n_examples
    left.plot(fine, check.trace_sigma * noise_coefficient(fine), color=GREY, lw=1.2, ls=":",
              label="tr Σ / B (with replacement)")  # fmt: skip
    left.plot(fine, check.trace_sigma * noise_coefficient(fine, n), color=VAL, lw=1.8,
              label="predicted tr Σ / B · (N − B)/(N − 1)")  # fmt: skip
    left.errorbar(b, measured, yerr=error, fmt="o", color=TRAIN, markersize=4.5, capsize=2,
                  label=f"measured, {check.draws} batches each (±2 s.e.)")  # fmt: skip
    if run_batch_size in b:
        left.axvline(run_batch_size, color=GREY, lw=1, ls="--")
        left.annotate(f"run's B = {run_batch_size}", (run_batch_size, predicted.max()),
                      xytext=(4, 0), textcoords="offset points", fontsize=8, color=GREY)  # fmt: skip
    left.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="E ‖ḡ_B − ∇C‖²",
             title="Batch-gradient error: measured vs predicted")  # fmt: skip
    left.set_xscale("log", base=2)
    left.legend(frameon=False, fontsize=8)

    k = np.array([c.draws for c in check.convergence], dtype=float)
    rel = np.array([c.rel_error for c in check.convergence])
    chance = np.array([c.chance_rel_error for c in check.convergence])
    right.plot(k, chance, color=VAL, lw=1.8, label="expected from chance alone ∝ 1/√k")
    right.plot(k, rel, "o-", color=TRAIN, markersize=4.5, lw=1.2, label="measured")
    right.set(xscale="log", yscale="log", xlabel="k, batches averaged",
              ylabel="‖mean of k ḡ_B − ∇C‖ / ‖∇C‖",
              title=f"Mean of k batch gradients → ∇C (B = {check.convergence_batch_size})")  # fmt: skip
    right.legend(frameon=False, fontsize=8)
    return fig


def thumbnail_png(image: np.ndarray, vmin: float, vmax: float) -> bytes:
    """A grayscale image (h, w) as a small PNG, dark strokes on white, one pixel per value."""
    buffer = io.BytesIO()
    imsave(buffer, image, cmap="gray_r", vmin=vmin, vmax=vmax, format="png")
    return buffer.getvalue()


def _last_finite(values: np.ndarray) -> float:
    ok = np.flatnonzero(~np.isnan(values))
    return float(values[ok[-1]]) if ok.size else math.nan


def _cycle(k: int) -> str:
    palette = ("#1f6fb2", "#e8590c", "#2f9e44", "#7048e8", "#c2255c", "#0c8599",
               "#f08c00", "#5c940d", "#862e9c", "#495057")  # fmt: skip
    return palette[k % len(palette)]


def assumptions_figure(label_mix: np.ndarray | None, metrics: Metrics, other_cosine: float | None) -> Figure:
    """Left (with labels): each first-epoch batch's share of every class; right: the cosine
    between consecutive batch gradients over training, beside the mean over other pairs."""
    fig, axes = _figure(2 if label_mix is not None else 1, height=3.4)
    if label_mix is not None:
        ax = axes[0]
        image = ax.imshow(label_mix.T, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower",
                          interpolation="nearest")  # fmt: skip
        ax.set(xlabel="batch in epoch 1 (training order)", ylabel="class",
               title="Share of each class in each batch")  # fmt: skip
        ax.set_yticks(range(label_mix.shape[1]))
        ax.grid(False)
        fig.colorbar(image, ax=ax, shrink=0.85, label="share of the batch")
    ax = axes[-1]
    steps, cosine = metrics.column(Column.STEP), metrics.column(Column.GRAD_COSINE)
    ok = np.isfinite(cosine)
    ax.plot(steps[ok], cosine[ok], color=TRAIN, lw=1.6, label="consecutive steps (mean over log window)")
    if other_cosine is not None:
        ax.axhline(other_cosine, color=GREY, lw=1.4, ls="--", label="all other pairs of steps")
    ax.axhline(0, color="#adb5bd", lw=0.8)
    ax.set_ylim(min(-0.2, float(np.nanmin(cosine)) - 0.05) if ok.any() else -0.2, 1.0)
    ax.set(xlabel="step", ylabel="cosine", title="Alignment of batch gradients")
    ax.legend(frameon=False, loc="lower right")
    return fig
