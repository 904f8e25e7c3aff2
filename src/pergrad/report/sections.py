"""The report's sections. Each function returns its HTML and the numbers it shows (for
``report_data.json``), so that the page and the data file can never disagree."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
from torch import Tensor

from ..checks.sampling import SamplingReport
from ..stats.adaptive_batch import LR_SCALINGS
from ..stats.alignment import AlignmentReport
from ..stats.noise_scale import b_simple_ratio
from ..train.config import TrainConfig
from ..train.loop import batch_size_rule
from ..train.metrics import Column
from . import figures
from ._format import number
from .advice import FACTOR, TAIL, UNKNOWN, BatchSizeAdvice
from .html import Raw, data_uri, esc, figure, note, section, table
from .run_files import Metrics, Run
from .theta import ExamplesAtTheta
from .unbiasedness import UnbiasednessCheck

__all__ = [
    "summary_section",
    "assumptions_section",
    "curves_section",
    "noise_scale_section",
    "snr_section",
    "norms_section",
    "outliers_section",
    "unbiasedness_section",
    "footer",
    "SECTIONS",
    "OUTLIERS",
    "SNR_DEFINITION",
]

SECTIONS = (
    ("summary", "Summary"),
    ("assumptions", "Are the batches random?"),
    ("curves", "Loss and accuracy"),
    ("noise-scale", "Noise scale and batch size"),
    ("cbs", "Critical batch size"),
    ("snr", "Signal-to-noise per parameter"),
    ("norms", "Per-example gradient norms"),
    ("outliers", "Largest gradients"),
    ("unbiasedness", "Is the mini-batch gradient unbiased?"),
)
OUTLIERS = 12  # examples shown in the outliers section
SNR_DEFINITION = (
    "the ratio of the squared norm of the tensor's mean gradient to the total variance of its "
    "per-example gradients, |G_p|² / tr Σ_p, smoothed over steps as the trainer logs it"
)
_TITLES = dict(SECTIONS)
_FILES = (
    ("config.toml", "the run's settings"),
    ("metrics.csv", "one row of statistics per logged step"),
    ("checkpoint.pt", "weights θ and training state at the last checkpoint"),
    ("report.html", "this report"),
    ("report_data.json", "the numbers shown in this report"),
)


def summary_section(run: Run, n_train: int, n_val: int, advice: BatchSizeAdvice) -> tuple[Raw, dict]:
    """Key results, the config, and where the files are."""
    m = run.metrics
    final = {name: dict(zip(("value", "step"), m.last(name), strict=True)) for name in
             (Column.LOSS, Column.ACCURACY, Column.VAL_LOSS, Column.VAL_ACCURACY)}  # fmt: skip
    stats = [
        ("final training loss", final[Column.LOSS]),
        ("final validation loss", final[Column.VAL_LOSS]),
        ("final validation accuracy", final[Column.VAL_ACCURACY]),
    ]
    tiles = "".join(
        _tile(number(v["value"]), label if v["step"] is None else f"{label} (step {v['step']})")
        for label, v in stats
        if label != "final validation accuracy" or v["value"] is not None
    )
    if advice.verdict != UNKNOWN:
        name = "B_simple" if advice.basis == "B_crit" else advice.basis
        tiles += _tile(f"batch {advice.verdict}", f"B = {advice.batch_size} against {name} = {number(advice.b_simple)}")

    config = run.config
    config_rows = [(f.name, getattr(config, f.name)) for f in fields(config)]
    half = (len(config_rows) + 1) // 2
    config_tables = Raw(
        '<div class="grid">'
        + table(["setting", "value"], config_rows[:half], table_id="config").markup
        + table(["setting", "value"], config_rows[half:]).markup
        + "</div>"
    )
    last_row = m.rows[-1]
    checkpoint_step = run.checkpoint.get("step")
    result_rows = [
        ("steps trained (checkpoint)", checkpoint_step if checkpoint_step is not None else "–"),
        ("logged rows in metrics.csv", f"{len(m.rows)} (steps {m.rows[0][Column.STEP]}–{last_row[Column.STEP]})"),
        ("examples seen", last_row.get(Column.EXAMPLES) if last_row.get(Column.EXAMPLES) is not None else "–"),
        ("training / validation examples", f"{n_train} / {n_val}"),
        *((f"final {name.replace('_', ' ')} (step {v['step']})", number(v["value"]))
          for name, v in final.items() if v["value"] is not None),
    ]  # fmt: skip
    files = table(
        ["file", "what it holds"],
        [(Raw(f'<a href="{esc(name)}"><code>{esc(name)}</code></a>'), what) for name, what in _FILES],
    )
    body = section(
        "summary",
        _TITLES["summary"],
        Raw(f"<div>{tiles}</div>"),
        Raw("<h3>Result</h3>"),
        table(["", ""], result_rows, numeric=(1,), table_id="result"),
        Raw("<h3>Configuration</h3>"),
        config_tables,
        Raw(f"<h3>Files</h3><p>In <code>{esc(run.path.resolve())}</code>:</p>"),
        files,
        lead=f"{config.model} on {config.dataset}, {config.optimizer} with learning rate "
        f"{config.lr:g}, batch size {_batch_size_text(config)}, {config.epochs} epoch(s), seed {config.seed}.",
    )
    data = {
        "final": final,
        "steps": checkpoint_step,
        "logged_rows": len(m.rows),
        "n_train": n_train,
        "n_val": n_val,
        "run_dir": str(run.path.resolve()),
        "config": config.to_dict(),
    }
    return body, data


def _batch_size_text(config: TrainConfig) -> str:
    if not config.auto:
        return str(config.batch_size)
    bounds = f"{config.min_batch_size}–{config.max_batch_size}"
    return f"auto ({bounds}; the learning rate is the one at {config.min_batch_size})"


def assumptions_section(
    sampling: SamplingReport,
    order: str,
    label_mix: np.ndarray | None,
    alignment: AlignmentReport | None,
    metrics: Metrics,
) -> tuple[Raw, dict]:
    """The sampling check on the run's batch order, and how aligned its batch gradients were."""
    verdict = (
        f'<span class="{"ok" if sampling.passed else "warn"}">'
        f"{'passes' if sampling.passed else 'FAILS'}</span> the sampling check "
        f"(p = {sampling.p_value:.2g} at level {sampling.level:g})"
    )
    lead = Raw(
        "A mini-batch gradient is an unbiased estimate of the full-data gradient only when each "
        "batch is a random draw from the training set. This run's batch order "
        f"(<code>order = {esc(order)}</code>) {verdict}: its first epoch of batch indices is tested "
        "against random sampling without replacement (index order, each batch's label mix "
        "against the dataset's by a chi-square test, repeated or missing examples)."
    )
    parts = [Raw(f"<p>{esc(sampling.explanation)}</p>")]
    caption = (
        "Right: the cosine between the batch gradients of consecutive steps, averaged over each "
        "log window, beside its mean over all other pairs of steps. Consecutive steps share a "
        "slowly moving full gradient, so some excess alignment is normal (about "
        "1 / (1 + B_simple / B) for independent batches); batches of one class in a row push in "
        "the same class-specific direction step after step and stand far above it."
    )
    if label_mix is not None:
        caption = (
            "Left: the share of each class in each batch of the first epoch; random batches look "
            "like even noise, sorted batches like a staircase. " + caption
        )
    if metrics.has(Column.GRAD_COSINE):
        png = figures.png_bytes(
            figures.assumptions_figure(label_mix, metrics, None if alignment is None else alignment.other_cosine)
        )
        parts.append(figure(png, "class mix per batch and alignment of consecutive batch gradients", caption))
    if alignment is not None:
        parts.append(note(
            f"Over the last {alignment.num_steps} steps, consecutive batch gradients have mean cosine "
            f"{alignment.consecutive_cosine:.3f} and all other pairs {alignment.other_cosine:.3f} "
            f"(permutation p-value {alignment.p_value:.2g}). A low p-value alone does not prove "
            "correlated batches, because the full gradient itself drifts slowly along the trajectory; "
            "read it with the index check above, which does not depend on the model."
        ))  # fmt: skip
    body = section("assumptions", _TITLES["assumptions"], *parts, lead=lead)
    data = {
        "order": order,
        "passed": sampling.passed,
        "p_value": sampling.p_value,
        "level": sampling.level,
        "chi2_p_value": sampling.chi2_p_value,
        "ascent_fraction": sampling.ascent_fraction,
        "repeated": sampling.repeated,
        "missing": sampling.missing,
        "consecutive_cosine": None if alignment is None else alignment.consecutive_cosine,
        "other_cosine": None if alignment is None else alignment.other_cosine,
        "alignment_p_value": None if alignment is None else alignment.p_value,
    }
    return body, data


def curves_section(metrics: Metrics) -> tuple[Raw, dict]:
    """Training and validation loss (and accuracy)."""
    png = figures.png_bytes(figures.curves_figure(metrics))
    classification = metrics.has(Column.ACCURACY) or metrics.has(Column.VAL_ACCURACY)
    caption = (
        "Training values are averages over the examples seen since the previous logged row (so "
        "they lag the weights a little); validation values are measured on held-out examples at "
        "each logged step."
    )
    if classification:
        caption += " Accuracy is the share of correct predictions."
    caption += " A growing gap between the two curves means the model is memorising its training set."
    body = section("curves", _TITLES["curves"], figure(png, "loss and accuracy curves", caption))
    return body, {"rows": len(metrics.rows), "classification": classification}


def noise_scale_section(
    metrics: Metrics,
    advice: BatchSizeAdvice,
    config: TrainConfig | None = None,
    batch_sizes: list[tuple[int, int]] | None = None,
    smoothing: str | None = None,
) -> tuple[Raw, dict]:
    """B_simple over training against the batch size, with the advice; for a ``pergrad train``
    run (``config``) with ``batch_size = "auto"``, how B and the learning rate followed B_simple
    (``batch_sizes``: the (first step, B) of each batch size). ``smoothing``: how the logged
    statistics were measured and smoothed (:func:`pergrad.stats.smoothing.describe_smoothing`),
    stated under the advice."""
    data = {
        "verdict": advice.verdict,
        "batch_size": advice.batch_size,
        "b_simple_median": advice.b_simple,
        "b_simple_low_median": advice.b_simple_low,
        "b_simple_high_median": advice.b_simple_high,
        "first_step": advice.first_step,
        "last_step": advice.last_step,
        "n_values": advice.n_values,
        "n_logged": advice.n_logged,
        "tail": TAIL,
        "factor": FACTOR,
        "message": advice.message,
        "predictor": advice.basis,
    }
    box = Raw(
        f'<div class="advice {advice.verdict.replace(" ", "-")}" id="advice">'
        f"<h3>Batch size: {esc(advice.verdict)}</h3><p>{esc(advice.message)}</p></div>"
    )
    lead = (
        "The gradient noise scale B_simple = tr Σ / |G|² compares the noise in one example's "
        "gradient (tr Σ, the total variance of per-example gradients) with the signal (|G|², the "
        "squared norm of the true gradient). A batch of B examples has noise tr Σ / B, so "
        "B_simple is the batch size at which noise and signal are equal (McCandlish et al. 2018)."
    )
    if smoothing is not None:
        data["smoothing"] = smoothing
        box = Raw(box.markup + f'<p id="smoothing">{esc(smoothing)}</p>')
    auto = config is not None and config.auto
    adaptive = []
    if auto:
        adaptive, data["adaptive"] = _adaptive_batch_size(config, batch_sizes, metrics)
    if advice.verdict == UNKNOWN:
        return section("noise-scale", _TITLES["noise-scale"], box, *adaptive, lead=lead), data
    png = figures.png_bytes(figures.noise_scale_figure(metrics, advice, batch_sizes if auto else None))
    n_inf = int(np.isinf(metrics.column(Column.B_SIMPLE)).sum())
    caption = (
        "Blue: B_simple as logged (a smoothed ratio of the two estimates), with its 95% interval "
        "as a band; dashed orange: the batch size used. Above the line, a bigger batch would still "
        "cut the noise almost in proportion; below it, extra examples per step are mostly wasted. "
        f"The advice reads the median over the grey span (the last {TAIL:.0%} of logged values)."
    )
    if n_inf:
        caption += (
            f" On {n_inf} logged step(s) the signal estimate |G|² was not positive, so B_simple "
            "is unbounded (∞, triangles at the top)."
        )
    name = "B_simple" if advice.basis == "B_crit" else advice.basis
    if metrics.has(Column.B_PRECOND):
        caption += (
            " Violet: B_P = tr(PΣ) / GᵀPG, the noise scale in Adam's metric P = 1/(√v̂ + ε) (its band, the "
            "95% interval); under Adam the advice reads B_P, and the table gives both."
        )
    rows = [
        ("batch size B", advice.batch_size),
        (f"median {name}, last {TAIL:.0%} of logged values", number(advice.b_simple)),
        ("median interval (low – high)", f"{number(advice.b_simple_low)} – {number(advice.b_simple_high)}"),
        ("steps", f"{advice.first_step}–{advice.last_step}"),
        ("values used / logged", f"{advice.n_values} / {advice.n_logged}"),
        ("thresholds", f"too small if {name} > {FACTOR:g}·B; wasteful if B > {FACTOR:g}·{name}"),
    ]
    if name == "B_P":
        rows.insert(2, ("median B_simple (SGD's noise scale), same steps", number(_tail_median(metrics, advice))))
        data["b_simple_same_steps_median"] = _tail_median(metrics, advice)
    two_batch = _two_batch_median(metrics, advice)
    data["b_simple_two_batch_median"] = two_batch
    if two_batch is not None:
        caption += (
            " Dotted grey: B_simple from the two-batch estimator of McCandlish et al., which needs no "
            "per-example gradients: the squared norms of the micro-batch gradients (each worker's "
            "batch when there is no accumulation) against that of the global batch. Its median over "
            f"the grey span is {number(two_batch)}, beside {number(advice.b_simple)} from the "
            "per-example norms; both estimate the same quantity, the per-example one from every example's own gradient."
        )
        rows.insert(2, ("median two-batch B_simple, same steps", number(two_batch)))
    numbers = table(["used for the advice", "value"], rows, numeric=(1,), table_id="advice-numbers")
    body = section(
        "noise-scale",
        _TITLES["noise-scale"],
        box,
        figure(png, "B_simple over training against the batch size", caption),
        *adaptive,
        numbers,
        lead=lead,
    )
    return body, data


def _adaptive_batch_size(
    config: TrainConfig, batch_sizes: list[tuple[int, int]], metrics: Metrics
) -> tuple[list, dict]:
    """What ``--batch-size auto`` did: its rule, the learning-rate rule, each change, and the
    steps it took for its examples against a fixed B_min."""
    rule = batch_size_rule(config)
    power = LR_SCALINGS[rule.lr_scaling]
    b_min = config.min_batch_size
    formula = f"η = {config.lr:g} · B / {b_min}" if power == 1 else f"η = {config.lr:g} · √(B / {b_min})"
    changes = [{"step": step, "batch_size": b, "lr": config.lr * (b / b_min) ** power} for step, b in batch_sizes]
    text = (
        f"The batch size was automatic (--batch-size auto): B started at {b_min} and followed B_simple "
        f"within [{b_min}, {config.max_batch_size}]. Before each step, B moved to B_simple (rounded, "
        "within the bounds) if B_simple's 95% interval excluded B, and held otherwise, so noise alone "
        f"does not move it. It changed {len(batch_sizes) - 1} time(s): the dashed orange steps, a dot "
        f"at each change. The learning rate followed B by the optimizer's rule, "
        f"{'linear for SGD' if power == 1 else 'the square root for Adam'}: {formula}."
    )
    steps, examples = metrics.last(Column.STEP)[0], metrics.last(Column.EXAMPLES)[0]
    if steps and examples:
        text += (
            f" Up to step {steps:.0f} it took {steps:.0f} steps for {examples:.0f} examples (mean B = "
            f"{examples / steps:.1f}); a fixed B = {b_min} takes {math.ceil(examples / b_min)} steps for as "
            "many. Whether it reaches a given loss in fewer steps or examples than a fixed batch is a "
            "comparison of runs: benchmarks/adaptive_batch.py makes it on digits."
        )
    rows = [(c["step"], c["batch_size"], number(c["lr"])) for c in changes]
    parts = [
        Raw("<h3>Automatic batch size</h3>"),
        Raw(f"<p>{esc(text)}</p>"),
        table(["from step", "batch size B", "learning rate"], rows, numeric=(0, 1, 2), table_id="batch-size-changes"),
    ]
    data = {
        "min_batch_size": b_min,
        "max_batch_size": config.max_batch_size,
        "lr_scaling": rule.lr_scaling,
        "changes": changes,
    }
    return parts, data


def _tail_median(metrics: Metrics, advice: BatchSizeAdvice) -> float | None:
    """The median B_simple over the steps the advice read (for a run whose advice reads B_P)."""
    steps, values = metrics.column(Column.STEP), metrics.column(Column.B_SIMPLE)
    used = (steps >= advice.first_step) & (steps <= advice.last_step) & ~np.isnan(values)
    return float(np.median(values[used])) if used.any() else None


def _two_batch_median(metrics: Metrics, advice: BatchSizeAdvice) -> float | None:
    """Median of the logged two-batch B_simple over the steps the advice read; None if not logged."""
    if not metrics.has(Column.B_SIMPLE_TWO_BATCH):
        return None
    steps, values = metrics.column(Column.STEP), metrics.column(Column.B_SIMPLE_TWO_BATCH)
    used = (steps >= advice.first_step) & (steps <= advice.last_step) & ~np.isnan(values)
    return float(np.median(values[used])) if used.any() else None


def snr_section(metrics: Metrics, batch_size: int) -> tuple[Raw, dict]:
    """Per-parameter SNR: last values, and lines over training when there are few."""
    names = metrics.snr_names
    last = {name: metrics.last(Column.snr(name))[0] for name in names}
    data = {"last": last}
    if not names:
        return section("snr", _TITLES["snr"], "No per-parameter SNR was logged for this run."), data
    png = figures.png_bytes(figures.snr_figure(metrics, batch_size))
    caption = (
        f"The SNR of a parameter tensor is {SNR_DEFINITION}. High: the examples agree on which way "
        "to move that tensor. A batch of B examples has B times the SNR of one example, so below "
        f"the dashed line at 1/B = 1/{batch_size} the batch gradient for that tensor is mostly noise."
    )
    if len(names) > figures.MAX_SNR_LINES:
        caption += f" With {len(names)} parameters, only the last values are drawn."
    ranked = sorted(last.items(), key=lambda kv: -math.inf if kv[1] is None else -kv[1])
    rows = [(name, number(value)) for name, value in ranked]
    body = section(
        "snr",
        _TITLES["snr"],
        figure(png, "per-parameter signal-to-noise ratio", caption),
        Raw(
            "<details><summary>Last values, highest first</summary>"
            + table(["parameter", "SNR"], rows, numeric=(1,), table_id="snr-table").markup
            + "</details>"
        ),  # fmt: skip
    )
    return body, data


def norms_section(examples: ExamplesAtTheta, metrics: Metrics) -> tuple[Raw, dict]:
    """Histogram and quantiles of ‖∇ℓᵢ‖ at θ over the training set."""
    norms = examples.norms
    at_theta = {label: float(np.quantile(norms, q)) for label, q in Column.NORM_QUANTILES}
    at_theta.update(max=float(norms.max()), mean=float(norms.mean()))
    logged = {label: metrics.last(Column.norm(label))[0] for label in (*dict(Column.NORM_QUANTILES), "max")}
    logged_step = metrics.last(Column.norm("q50"))[1]
    png = figures.png_bytes(figures.norms_figure(norms, {k: at_theta[k] for k, _ in Column.NORM_QUANTILES}, logged))
    caption = (
        f"Each of the {len(norms)} training examples' gradient norm ‖∇ℓᵢ‖ at the saved parameters, "
        "computed with pergrad in one backward pass per chunk (model in eval mode, float64). "
        "Solid lines: quantiles at θ; dotted: the quantiles the trainer logged over its last "
        "window of training batches. A long right tail means a few examples pull much harder "
        "than the rest: see the next section."
    )
    rows = [
        (label, number(at_theta[label]), number(logged.get(label))) for label in ("q10", "q50", "q90", "max", "mean")
    ]
    body = section(
        "norms",
        _TITLES["norms"],
        figure(png, "histogram of per-example gradient norms", caption),
        table(
            [
                "quantile",
                f"at θ, all {len(norms)} training examples",
                f"last training window (metrics.csv, step {logged_step if logged_step is not None else '–'})",
            ],
            rows,
            numeric=(1, 2),
            table_id="norm-quantiles",
        ),  # fmt: skip
    )
    return body, {"n_examples": len(norms), "at_theta": at_theta, "logged": logged, "logged_step": logged_step}


def outliers_section(examples: ExamplesAtTheta, x: Tensor, y: Tensor, image_shape, task: str) -> tuple[Raw, dict]:
    """The training examples with the largest gradient norms."""
    order = np.argsort(-examples.norms, kind="stable")[:OUTLIERS]
    records = []
    for i in order.tolist():
        records.append({
            "index": i,
            "norm": float(examples.norms[i]),
            "loss": float(examples.losses[i]),
            "target": _value(y[i]),
            "prediction": _value(examples.predictions[i]),
        })  # fmt: skip
    lead = (
        f"The {len(records)} training examples whose gradients are largest at θ: they move the "
        "weights most, and are often mislabelled, unusual, or simply still wrong."
    )
    if image_shape is not None:
        lo, hi = float(x.min()), float(x.max())
        cards = []
        for r in records:
            image = x[r["index"]].reshape(image_shape).double().numpy()
            png = figures.thumbnail_png(image, lo, hi)
            right = r["target"] == r["prediction"]
            verdict = "right" if right else "wrong"
            cards.append(
                f'<div class="card"><img src="{data_uri(png)}" alt="training example {r["index"]}">'
                f'<div class="idx">#{r["index"]}</div>'
                f'<div class="{verdict}">label {esc(r["target"])} → pred. {esc(r["prediction"])}</div>'
                f"<div>‖∇ℓ‖ {esc(number(r['norm'], 3))} · loss {esc(number(r['loss'], 3))}</div></div>"
            )
        wrong = sum(r["target"] != r["prediction"] for r in records)
        caption = (
            f"Training images (index #, true label → the model's prediction at θ), largest gradient "
            f"first; {wrong} of {len(records)} are misclassified (red)."
        )
        shown = Raw(f'<div class="cards" id="outlier-cards">{"".join(cards)}</div>'
                    f"<p class=lead>{esc(caption)}</p>")  # fmt: skip
    else:
        shown = table(
            ["rank", "index", "‖∇ℓᵢ‖", "loss", "target", "prediction"],
            [(k + 1, r["index"], number(r["norm"]), number(r["loss"]), _text(r["target"]), _text(r["prediction"]))
             for k, r in enumerate(records)],
            numeric=(0, 1, 2, 3, 4, 5) if task == "regression" else (0, 1, 2, 3), table_id="outlier-table",
        )  # fmt: skip
    return section("outliers", _TITLES["outliers"], shown, lead=lead), {"examples": records}


def unbiasedness_section(check: UnbiasednessCheck, run_batch_size: int) -> tuple[Raw, dict]:
    """The sampling check at θ: measured against predicted, and the mean of many batches."""
    rows = check.rows
    z = [(r.measured - r.predicted) / r.std_error if r.std_error > 0 else 0.0 for r in rows]
    within = sum(abs(v) <= 3 for v in z)
    agree = within == len(rows)
    verdict = (
        f'<span class="{"ok" if agree else "warn"}">{within} of {len(rows)} batch sizes</span> '
        "have the measured error within 3 standard errors of the prediction"
    )
    subset = (
        f" Because the full gradient matrix would be too large ({check.n_train} examples × "
        f"{check.n_params} parameters), the check uses a random subset of N = {check.n_examples} "
        "training examples as its population: ∇C and tr Σ are over that subset."
        if check.subsampled
        else ""
    )
    lead = Raw(
        "At the saved parameters θ, every training example's gradient ∇ℓᵢ is computed exactly "
        "(float64, one row per example), and with it the full-data gradient ∇C = (1/N) Σᵢ ∇ℓᵢ. "
        f"Then, for each batch size B, {check.draws} random batches are drawn without replacement "
        "and their mean gradient ḡ_B compared with ∇C. If mini-batch gradients are unbiased "
        "estimates of ∇C, the mean of many ḡ_B converges to ∇C, and their squared error "
        "follows E‖ḡ_B − ∇C‖² = tr Σ / B · (N − B)/(N − 1), with "
        "tr Σ = (1/N) Σᵢ ‖∇ℓᵢ − ∇C‖²." + esc(subset)
    )
    tiles = "".join(
        _tile(v, label)
        for label, v in (
            ("examples N", check.n_examples),
            ("parameters p", check.n_params),
            ("tr Σ", number(check.trace_sigma)),
            ("‖∇C‖²", number(check.full_grad_sq_norm)),
            ("B_simple at θ = tr Σ / ‖∇C‖²", number(float(b_simple_ratio(check.trace_sigma, check.full_grad_sq_norm)))),
        )
    )
    identity = (
        f"Sanity check: the mean of the per-example gradients equals plain autograd's gradient "
        f"of the mean loss to max |difference| = {check.autograd_max_diff:.1e}."
    )
    png = figures.png_bytes(figures.unbiasedness_figure(check, run_batch_size))
    caption = (
        "Left: the mean squared distance between a random batch's gradient and the full-data "
        "gradient (dots, ±2 standard errors) lies on the prediction (orange), which falls like 1/B "
        "and faster as B nears N, because a batch drawn without replacement repeats no example. "
        "Right: averaging k random batch gradients approaches ∇C, and the remaining error is "
        "the size chance alone predicts for unbiased draws (orange, falling as 1/√k); a bias "
        "would show as an error that stops falling."
    )
    table_rows = [
        (r.batch_size, f"{number(r.measured)} ± {number(r.std_error, 2)}", number(r.predicted),
         f"{r.ratio:.3f}", f"{zv:+.1f}", number(r.mean_rel_error, 3), number(r.chance_rel_error, 3))
        for r, zv in zip(rows, z, strict=True)
    ]  # fmt: skip
    convergence_rows = [(c.draws, number(c.rel_error, 3), number(c.chance_rel_error, 3)) for c in check.convergence]
    body = section(
        "unbiasedness",
        _TITLES["unbiasedness"],
        Raw(f"<div>{tiles}</div>"),
        Raw(f"<p>{verdict}.</p>"),
        figure(png, "measured against predicted batch-gradient error", caption),
        Raw("<h3>Measured against predicted, per batch size</h3>"),
        table(
            ["B", "measured E‖ḡ_B − ∇C‖² ± s.e.", "predicted", "ratio", "z", "‖mean ḡ_B − ∇C‖ / ‖∇C‖", "chance level"],
            table_rows,
            numeric=range(7),
            table_id="unbiasedness-table",
        ),  # fmt: skip
        note(
            f"z = (measured − predicted) / standard error: within ±3 when measurement and theory "
            f"agree. The last two columns compare the mean of the {check.draws} batch gradients "
            "with ∇C against the error chance alone would leave."
        ),
        Raw(f"<h3>The mean of k batch gradients (B = {check.convergence_batch_size})</h3>"),
        table(
            ["k batches", "‖mean ḡ_B − ∇C‖ / ‖∇C‖", "chance level √(predicted / k) / ‖∇C‖"],
            convergence_rows,
            numeric=(0, 1, 2),
            table_id="convergence-table",
        ),  # fmt: skip
        note(identity),
        lead=lead,
    )
    data = {
        "n_examples": check.n_examples,
        "n_train": check.n_train,
        "subsampled": check.subsampled,
        "n_params": check.n_params,
        "draws": check.draws,
        "trace_sigma": check.trace_sigma,
        "full_grad_sq_norm": check.full_grad_sq_norm,
        "autograd_max_diff": check.autograd_max_diff,
        "rows": [
            {
                "batch_size": r.batch_size,
                "measured": r.measured,
                "std_error": r.std_error,
                "predicted": r.predicted,
                "ratio": r.ratio,
                "z": zv,
                "mean_rel_error": r.mean_rel_error,
                "chance_rel_error": r.chance_rel_error,
            }
            for r, zv in zip(rows, z, strict=True)
        ],  # fmt: skip
        "convergence_batch_size": check.convergence_batch_size,
        "convergence": [
            {"draws": c.draws, "rel_error": c.rel_error, "chance_rel_error": c.chance_rel_error}
            for c in check.convergence
        ],
    }
    return body, data


def footer(run_dir: Path, version: str) -> Raw:
    """How to rebuild the report."""
    return Raw(
        f"Built by pergrad {esc(version)} from the files in this run directory. Rebuild it at any "
        f"time, for example after training more, with <code>pergrad report {esc(run_dir)}</code>. "
        "The page is self-contained: it loads nothing from the network."
    )


def _tile(value: object, label: str) -> str:
    """A big number with a small label under it."""
    return f'<div class="stat"><b>{esc(value)}</b><span>{esc(label)}</span></div>'


def _value(t: Tensor) -> int | float | list:
    """A target or prediction as JSON: an int (class), a float (value), or a list (tokens)."""
    if t.dim() > 0:
        return t.tolist()
    return t.item() if t.is_floating_point() else int(t.item())


def _text(value: int | float | list, max_tokens: int = 16) -> str:
    if isinstance(value, list):
        shown = " ".join(map(str, value[:max_tokens]))
        return shown + (" …" if len(value) > max_tokens else "")
    return number(value) if isinstance(value, float) else str(value)
