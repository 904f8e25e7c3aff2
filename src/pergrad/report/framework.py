"""The report of a run directory written by a framework callback (:mod:`pergrad.integrations`).

Such a directory holds ``config.toml`` (the callback's settings, with a ``framework`` key) and
``metrics.csv`` in the trainer's schema, but no checkpoint or dataset: the framework keeps the
model and the data. The report shows what the metrics carry (loss, the noise scale against the
batch size with the advice, the per-parameter SNR, the logged per-example norm quantiles) and
names the sections it leaves out and why.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .. import __version__
from ..stats.smoothing import describe_smoothing
from ..train.metrics import Column
from . import figures, sections
from ._format import number
from .advice import advise_batch_size
from .html import Raw, page, section, table
from .run_files import Metrics, load_metrics

__all__ = ["framework_settings", "framework_report", "SKIPPED"]

SKIPPED = (
    ("assumptions", "the batch order and the gradients of consecutive steps"),
    ("cbs", "a batch-size sweep (pergrad cbs trains its own model)"),
    ("outliers", "the dataset and the weights"),
    ("unbiasedness", "the dataset and the weights"),
)


def framework_settings(run_dir: Path) -> dict | None:
    """``config.toml`` of a callback's run directory as a dict; None for any other directory."""
    try:
        settings = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return settings if "framework" in settings else None


def framework_report(run_dir: Path, settings: dict) -> tuple[str, dict]:
    """The report's HTML and numbers, from ``run_dir``'s ``metrics.csv`` alone.

    Raises:
        ReportError: the metrics file is missing or unreadable.
    """
    metrics = load_metrics(run_dir / "metrics.csv")
    batch_size = int(metrics.last(Column.BATCH_SIZE)[0] or 0)
    advice = advise_batch_size(
        metrics.column(Column.STEP), metrics.column(Column.B_SIMPLE), metrics.column(Column.B_SIMPLE_LOW),
        metrics.column(Column.B_SIMPLE_HIGH), batch_size,
    )  # fmt: skip
    with figures.style():
        parts = {
            "summary": _summary(run_dir, settings, metrics),
            "curves": sections.curves_section(metrics),
            "noise-scale": sections.noise_scale_section(metrics, advice, smoothing=_smoothing(settings)),
            "snr": sections.snr_section(metrics, batch_size),
            "norms": _logged_norms(metrics),
        }
    shown = [(i, t) for i, t in sections.SECTIONS if i in parts]
    data = {"pergrad_version": __version__, "framework": settings["framework"]}
    data.update({i: parts[i][1] for i, _ in shown})
    data["skipped"] = [i for i, _ in SKIPPED]
    html = page(
        title="pergrad run report",
        subtitle=f"{run_dir.resolve()} · a {settings['framework']} run · step {metrics.rows[-1][Column.STEP]}",
        nav=shown,
        sections=[parts[i][0] for i, _ in shown],
        footer=sections.footer(run_dir, __version__),
    )
    return html, data


def _smoothing(settings: dict) -> str | None:
    """How the callback smoothed its statistics, from its settings (None where they lack β)."""
    beta = settings.get("beta")
    if not isinstance(beta, (int, float)):
        return None
    return describe_smoothing(float(beta), int(settings.get("measure_every", 1)))


def _summary(run_dir: Path, settings: dict, metrics: Metrics) -> tuple[Raw, dict]:
    """The callback's settings, the final loss, and the sections this run cannot have."""
    loss, step = metrics.last(Column.LOSS)
    titles = dict(sections.SECTIONS)
    skipped = table(["section left out", "it needs"], [(titles[i], why) for i, why in SKIPPED], table_id="skipped")
    body = section(
        "summary",
        titles["summary"],
        table(["setting", "value"], sorted(settings.items()), table_id="config"),
        Raw(f"<p>Final training loss {number(loss)} (step {step}), {len(metrics.rows)} logged rows.</p>"),
        Raw("<h3>Not in this report</h3>"),
        skipped,
        lead=f"A run trained by {settings['framework']}, measured by pergrad's callback: the statistics "
        "below are those it logged at every measured step. The framework keeps the model and the data, so the "
        "sections that recompute per-example gradients at the saved weights are left out.",
    )
    return body, {"settings": settings, "final_loss": loss, "final_step": step, "logged_rows": len(metrics.rows)}


def _logged_norms(metrics: Metrics) -> tuple[Raw, dict]:
    """The per-example norm quantiles the callback logged, at the last row."""
    labels = (*dict(Column.NORM_QUANTILES), "max")
    logged = {label: metrics.last(Column.norm(label))[0] for label in labels}
    step = metrics.last(Column.norm("q50"))[1]
    body = section(
        "norms",
        dict(sections.SECTIONS)["norms"],
        table(
            ["quantile", f"last logged step ({step if step is not None else '–'})"],
            [(label, number(logged[label])) for label in labels],
            numeric=(1,),
            table_id="norm-quantiles",
        ),  # fmt: skip
        lead="Quantiles of the per-example gradient norms ‖∇ℓᵢ‖ over the examples of the last logged step.",
    )
    return body, {"logged": logged, "logged_step": step}
