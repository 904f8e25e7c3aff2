"""The report's "Critical batch size" section, from the ``cbs.json`` that ``pergrad cbs`` wrote.

It shows the measured trade-off (steps against examples per batch size, the fitted hyperbola
and B_crit), the branched B*(t) against B_simple(t) of the run, and the ratio B_simple / B_crit
beside the value McCandlish et al. (2018) report for MNIST. A run without ``cbs.json`` gets a
short section that says how to measure it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .._json import INF
from ..train.metrics import Column
from . import figures
from ._format import number
from .html import Raw, figure, note, section, table
from .run_files import Metrics, ReportError

__all__ = ["CBS_FILE", "PUBLISHED", "load_cbs", "cbs_section", "cbs_figure"]

CBS_FILE = "cbs.json"
# McCandlish et al. 2018 (arXiv:1812.06162), Table 1, as quoted in pergrad's issue 14: the task,
# B_crit and B_simple. The paper finds the two within about an order of magnitude of each other.
PUBLISHED = (("MNIST (McCandlish et al. 2018, Table 1)", 200.0, 900.0),)


def load_cbs(run_dir: str | Path) -> dict | None:
    """The run's ``cbs.json`` with "inf" strings as floats; None when there is none.

    Raises:
        ReportError: the file exists but is not a cbs.json that pergrad cbs wrote.
    """
    path = Path(run_dir) / CBS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(), parse_constant=float)
        _ = data["b_crit"], data["points"], data["b_simple"], data["branches"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(
            f"{path} is not a cbs.json that pergrad cbs wrote ({err}); rerun pergrad cbs or remove it"
        ) from None
    return _floats(data)


def _floats(value):
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return float(value) if value in (INF, "-" + INF) else value


def cbs_section(section_id: str, title: str, cbs: dict | None, metrics: Metrics) -> tuple[Raw, dict]:
    """The section's HTML and numbers."""
    lead = (
        "B_simple predicts the batch size beyond which more examples per step stop paying; the "
        "critical batch size B_crit measures it. Training to a target loss at batch size B takes "
        "S(B) steps and E(B) = B·S(B) examples, and across batch sizes S = S_min (1 + B_crit/B): "
        "below B_crit a larger batch saves steps almost for free, above it mostly costs examples "
        "(McCandlish et al. 2018)."
    )
    if cbs is None:
        text = "Not measured for this run: pergrad cbs with the same settings measures it (a few minutes with --quick)."
        return section(section_id, title, text, lead=lead), {"measured": False}
    png = figures.png_bytes(cbs_figure(cbs, metrics))
    caption = (
        "Left: each point is one seed at one batch size (its best learning rate), the line the fitted "
        "hyperbola S = S_min + E_min/B, dashed its asymptotes S_min and E_min; the star is B_crit, "
        "where steps and examples are both twice their minimum. Right: B*(t), the largest batch that a "
        "branch from the run's checkpoint at step t can use for the same number of examples without "
        f"losing more than {cbs['tolerance']:.0%} in validation loss (Merrill et al. 2025; an upward "
        "triangle is a lower bound: every branch passed; a downward one, at the run's own batch size, an "
        "upper bound: even twice the batch failed), against B_simple(t) of the run and B_crit."
    )
    if cbs.get("ground_truth"):
        caption += " Dotted: B_noise = tr(HΣ)/(GᵀHG) in closed form at the run's parameters (quadratic model)."
    rows = _numbers(cbs)
    published = [(name, number(b_crit), number(b_simple), number(b_simple / b_crit))
                 for name, b_crit, b_simple in PUBLISHED]  # fmt: skip
    ratio_low, ratio_high = cbs.get("ratio_interval") or (None, None)
    published.insert(0, ("this run", _with_interval(cbs["b_crit"], cbs["b_crit_interval"]),
                         _with_interval(cbs["b_simple"], cbs["b_simple_interval"]),
                         _with_interval(cbs["ratio"], cbs.get("ratio_interval"))))  # fmt: skip
    body = section(
        section_id,
        title,
        figure(png, "steps against examples per batch size, and B*(t) against B_simple(t)", caption),
        table(["measured", "value"], rows, numeric=(1,), table_id="cbs-numbers"),
        table(["", "B_crit", "B_simple", "B_simple / B_crit"], published, numeric=(1, 2, 3), table_id="cbs-published"),
        *_targets_table(cbs),
        note(_verdict(cbs)),
        *([note(_quick_text(cbs["quick_check"]))] if cbs.get("quick_check") else []),
        lead=lead,
    )
    data = {
        "measured": True,
        "b_crit": cbs["b_crit"],
        "b_crit_interval": cbs["b_crit_interval"],
        "b_crit_bounded": cbs["b_crit_bounded"],
        "b_simple": cbs["b_simple"],
        "b_simple_interval": cbs["b_simple_interval"],
        "ratio": cbs["ratio"],
        "ratio_interval": [ratio_low, ratio_high],
        "b_star": [{"step": b["step"], "b_star": b["b_star"], "bounded": b["bounded"]} for b in cbs["branches"]],
        "published": [list(p) for p in PUBLISHED],
        "ground_truth": cbs.get("ground_truth"),
        "b_precond": cbs.get("b_precond"),
        "b_precond_interval": cbs.get("b_precond_interval"),
        "at_targets": [{k: t.get(k) for k in _TARGET_KEYS} for t in cbs.get("at_targets", [])],
        "quick_check": cbs.get("quick_check"),
    }
    return body, data


_TARGET_KEYS = ("target_loss", "b_crit", "b_crit_interval", "b_crit_seed_interval", "b_simple", "b_simple_interval",
                "b_precond", "b_precond_interval", "lr_at_edge")  # fmt: skip


def _targets_table(cbs: dict) -> list:
    """B_crit at each target against both predictors at the run's crossing of it."""
    targets = cbs.get("at_targets") or []
    if not targets:
        return []
    rows = []
    for t in targets:
        rows.append((
            number(t["target_loss"]),
            _with_interval(t["b_crit"], t["b_crit_interval"]),
            _with_interval(t["b_crit"], t.get("b_crit_seed_interval")),
            _with_interval(t["b_simple"], t["b_simple_interval"]),
            _with_interval(t.get("b_precond"), t.get("b_precond_interval")),
        ))  # fmt: skip
    header = [
        "target loss",
        "B_crit (grid and seeds)",
        "B_crit (seeds only)",
        "B_simple at the target",
        "B_P at the target",
    ]
    return [table(header, rows, numeric=(0, 1, 2, 3, 4), table_id="cbs-targets")]


def _quick_text(check: dict) -> str:
    return (
        f"This is a --quick measurement. On {check['setup']}, --quick gave B_crit = {number(check['quick'])} "
        f"(interval {number(check['quick_interval'][0])} – {number(check['quick_interval'][1])}) against "
        f"{number(check['full'])} (interval {number(check['full_interval'][0])} – {number(check['full_interval'][1])}) "
        f"from the full sweep: {check['verdict']}"
    )


def _numbers(cbs: dict) -> list[tuple[str, str]]:
    sizes = sorted({p["batch_size"] for p in cbs["points"]})
    rows = [
        ("target validation loss", number(cbs["target_loss"])),
        ("batch sizes that reached it (best learning rate each)", ", ".join(str(b) for b in sizes) or "none"),
        ("S_min, fewest steps", number(cbs["s_min"])),
        ("E_min, fewest examples", number(cbs["e_min"])),
        ("B_crit = E_min / S_min", _with_interval(cbs["b_crit"], cbs["b_crit_interval"])),
        ("B_crit, seed bootstrap only (best learning rate per B)",
         _with_interval(cbs["b_crit"], cbs.get("b_crit_seed_interval"))),
        ("batch sizes whose best learning rate is at the grid's edge",
         ", ".join(str(b) for b in cbs.get("lr_at_edge") or []) or "none"),
        (f"B_simple of the run at the target (step {cbs['b_simple_step']})",
         _with_interval(cbs["b_simple"], cbs["b_simple_interval"])),
        ("B_simple / B_crit", _with_interval(cbs["ratio"], cbs.get("ratio_interval"))),
    ]  # fmt: skip
    if cbs.get("b_precond") is not None:
        ratio, interval = cbs.get("ratio_b_precond") or (None, None)
        rows += [
            ("B_P = tr(PΣ)/GᵀPG of the run at the target (Adam's metric)",
             _with_interval(cbs["b_precond"], cbs["b_precond_interval"])),
            ("B_P / B_crit", _with_interval(ratio, interval)),
        ]  # fmt: skip
    truth = cbs.get("ground_truth")
    if truth:
        rows += [
            (
                f"B_noise in closed form at the target (step {truth['steps_to_target']})",
                number(truth["b_noise_at_target"]),
            ),
            ("B_noise in closed form, median over the run up to the target", number(truth["b_noise_median_to_target"])),
            (
                "B_crit / B_noise (median up to the target)",
                number(_safe_ratio(cbs["b_crit"], truth["b_noise_median_to_target"])),
            ),
        ]  # fmt: skip
    return rows


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not 0 < b < math.inf else a / b


def _with_interval(value: float | None, interval) -> str:
    if value is None:
        return "–"
    if not interval or interval[0] is None:
        return number(value)
    return f"{number(value)} ({number(interval[0])} – {number(interval[1])})"


def _verdict(cbs: dict) -> str:
    """B_crit and the ratio in words."""
    if cbs["b_crit"] is None:
        return "Fewer than two batch sizes reached the target in every seed: no B_crit was fitted."
    low, high = cbs["b_crit_interval"] or (cbs["b_crit"], cbs["b_crit"])
    largest = max(p["batch_size"] for p in cbs["points"])
    if not cbs["b_crit_bounded"]:
        return (
            f"B_crit is at least {number(low)}: up to the largest batch tried ({largest}), steps still fall as 1/B, "
            "so the sweep bounds B_crit only from below; a larger dataset or batch would bound it."
        )
    text = (
        f"B_crit = {number(cbs['b_crit'])}, between {number(low)} and {number(high)} "
        + ("(the hull of the seed bootstrap's interval and of the refits on the second-best learning rate per batch "
           "size: the grid's coarseness counts, not seed noise alone)."
           if cbs.get("b_crit_seed_interval") is not None or "b_crit_grid_range" in cbs
           else f"({cbs['confidence']:.0%} bootstrap interval over seeds).")
    )  # fmt: skip
    if cbs["ratio"] is not None:
        ratio = cbs["ratio"]
        size = "within" if 0.1 <= ratio <= 10 else "outside"
        text += (
            f" B_simple / B_crit = {number(ratio)}: the prediction is {size} an order of magnitude of the measurement."
        )
    closer = _closer(cbs)
    if closer:
        text += " " + closer
    return text


def _closer(cbs: dict) -> str:
    """Which predictor, B_simple or B_P, is nearer the measured B_crit (in log ratio)."""
    ratios = {
        name: (cbs.get(f"ratio_{key}") or (None, None))[0]
        for name, key in (("B_simple", "b_simple"), ("B_P", "b_precond"))
    }
    if any(r is None or not 0 < r < math.inf for r in ratios.values()):
        return ""
    best = min(ratios, key=lambda k: abs(math.log(ratios[k])))
    other = "B_P" if best == "B_simple" else "B_simple"
    return (
        f"{best} is the nearer predictor here ({best} / B_crit = {number(ratios[best])}, "
        f"{other} / B_crit = {number(ratios[other])})."
    )


def cbs_figure(cbs: dict, metrics: Metrics) -> Figure:
    """Left: steps against examples with the fitted hyperbola and B_crit. Right: B*(t),
    B_simple(t), B_crit (and B_noise(t) where known) over training."""
    fig, (left, right) = figures._figure(2, height=3.6)
    points = cbs["points"]
    sizes = sorted({p["batch_size"] for p in points})
    colors = {b: figures._cycle(k) for k, b in enumerate(sizes)}
    for b in sizes:
        mine = [p for p in points if p["batch_size"] == b]
        left.plot([p["examples"] for p in mine], [p["steps"] for p in mine], "o", color=colors[b], markersize=4,
                  label=f"B = {b}")  # fmt: skip
    if cbs["s_min"] is not None:
        s_min, e_min = cbs["s_min"], cbs["e_min"]
        grid = np.geomspace(min(sizes) / 4, max(sizes) * 4, 200)
        steps = s_min + e_min / grid
        left.plot(grid * steps, steps, color=figures.GREY, lw=1.4, label="fit S = S_min + E_min/B")
        if s_min > 0:
            left.axhline(s_min, color=figures.GREY, lw=0.9, ls="--")
        left.axvline(e_min, color=figures.GREY, lw=0.9, ls="--")
        if math.isfinite(cbs["b_crit"]) and cbs["b_crit_bounded"]:
            left.plot([2 * e_min], [2 * s_min], "*", color="black", markersize=12,
                      label=f"B_crit = {number(cbs['b_crit'])}")  # fmt: skip
    left.set_xscale("log")
    left.set_yscale("log")
    left.set(xlabel="examples to the target E", ylabel="steps to the target S",
             title=f"Steps against examples (target loss {number(cbs['target_loss'])})")  # fmt: skip
    left.legend(frameon=False, fontsize=7.5)

    steps_run, b_simple = metrics.column(Column.STEP), metrics.column(Column.B_SIMPLE)
    shown = np.isfinite(b_simple) & (b_simple > 0)
    right.plot(steps_run[shown], b_simple[shown], color=figures.TRAIN, lw=1.6, label="B_simple(t) of the run")
    for b in cbs["branches"]:
        marker = "^" if not b["bounded"] else "v" if b["b_star"] == b["batch_sizes"][0] else "o"
        right.plot([b["step"]], [b["b_star"]], marker, color=figures.VAL, markersize=7)
    right.plot([], [], "o", color=figures.VAL, label="B*(t) from branches (^ at least, v at most)")
    if cbs["b_crit"] is not None and math.isfinite(cbs["b_crit"]):
        right.axhline(cbs["b_crit"], color="black", lw=1.2, ls="--", label="B_crit (sweep)")
        if cbs["b_crit_interval"] and math.isfinite(cbs["b_crit_interval"][1]):
            right.axhspan(*cbs["b_crit_interval"], color="black", alpha=0.08, lw=0)
    truth = (cbs.get("ground_truth") or {}).get("along_run")
    if truth:
        right.plot([r["step"] for r in truth], [r["b_noise"] for r in truth], ":", color=figures.ACCENT, lw=1.8,
                   marker="s", markersize=3, label="B_noise(t), closed form")  # fmt: skip
    right.set_yscale("log")
    right.set(xlabel="step of the run", ylabel="batch size", title="B*(t) from branches against B_simple(t)")
    right.legend(frameon=False, fontsize=7.5)
    for axis in (left.xaxis, left.yaxis, right.yaxis):  # plain numbers at 1, 2, 5 × 10ᵏ
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    return fig
