"""``pergrad report``: sections, embedded images, the advice and the numbers against the run's
own files, the unbiasedness check, and one-line errors for unusable run directories."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pergrad.cli.main import main
from pergrad.report import ReportError, build_report
from pergrad.report._format import number
from pergrad.report.advice import advise_batch_size
from pergrad.report.sections import OUTLIERS, SECTIONS
from pergrad.report.unbiasedness import (
    batch_sizes_for_check,
    center_and_gram,
    check_unbiasedness,
    draw_batches,
    MAX_ENTRIES,
    examples_for_check,
    sampling_errors,
)
from pergrad.train.checkpoint import save_checkpoint
from pergrad.train.config import TrainConfig
from pergrad.train.data import load_dataset
from pergrad.train.losses import per_example_losses
from pergrad.train.metrics import MetricsLog, read_metrics
from pergrad.train.models import build_model

SECTION_IDS = [section_id for section_id, _ in SECTIONS]
# B_simple per logged row of the linreg run: missing at first, then 17 values with two ∞; the
# last quarter of them, (14, 8, 12, ∞, 10), has median 12: B = 64 > 2·12 means "wasteful".
LINREG_B_SIMPLE = [None, None, None, 300.0, 250.0, math.inf, 120.0, 90.0, 60.0, 40.0, 30.0, 25.0,
                   20.0, 18.0, 15.0, 14.0, 8.0, 12.0, math.inf, 10.0]  # fmt: skip


def make_run(run_dir: Path, model: str, dataset: str, batch_size: int, b_simple: list, steps: int = 60) -> Path:
    """A run directory as ``pergrad train`` writes it: a few SGD steps of the config's model,
    its checkpoint, and a metrics.csv with one row per 3 steps and the given B_simple values."""
    run_dir.mkdir(parents=True)
    config = TrainConfig(model=model, dataset=dataset, batch_size=batch_size, lr=0.05, epochs=1,
                         log_every=3, out=str(run_dir))  # fmt: skip
    config.save(run_dir / "config.toml")
    data = load_dataset(config)
    net = build_model(config, data)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    names = [name for name, _ in net.named_parameters()]
    rows = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.train_x.shape[0], (batch_size,), generator=gen)
        opt.zero_grad()
        loss = per_example_losses(data.task, net(data.train_x[idx]), data.train_y[idx]).mean()
        loss.backward()
        opt.step()
        if step % 3 == 0:
            b = b_simple[len(rows)]
            classification = data.task == "classification"
            rows.append({
                "step": step, "epoch": 0, "examples": step * batch_size, "lr": config.lr,
                "batch_size": batch_size, "loss": loss.item(),
                "accuracy": 0.5 + step / 200 if classification else None,
                "val_loss": 1.1 * loss.item() if step % 6 == 0 else None,
                "val_accuracy": (0.4 + step / 200 if classification else None) if step % 6 == 0 else None,
                "b_simple": b, "b_simple_low": None if b is None else b / 2,
                "b_simple_high": None if b is None else 2 * b,
                "trace_sigma": 1.0, "grad_sq_norm": 0.1, "norm_q10": 0.1 * step, "norm_q50": 0.2 * step,
                "norm_q90": 0.3 * step, "norm_max": 0.5 * step,
                **{f"snr/{name}": 0.01 * (k + 1) * step for k, name in enumerate(names)},
            })  # fmt: skip
    MetricsLog(run_dir / "metrics.csv", rows).flush()
    save_checkpoint(run_dir / "checkpoint.pt",
                    {"model": net.state_dict(), "step": steps, "epoch": 0, "config": config.to_dict()})  # fmt: skip
    return run_dir


@pytest.fixture(scope="module")
def linreg_run(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("report") / "linreg", "linear", "linreg", 64, LINREG_B_SIMPLE)
    assert build_report(run) == run / "report.html"
    return run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    b_simple = [None] * 4 + [100.0 + k for k in range(16)]  # median ≈ 118 > 2·16: too small
    run = make_run(tmp_path_factory.mktemp("report") / "digits", "mlp", "digits", 16, b_simple)
    build_report(run)
    return run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def section_html(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def report_files(run: Path) -> tuple[str, dict]:
    return (run / "report.html").read_text(), json.loads((run / "report_data.json").read_text())


def test_every_section_is_there_and_the_page_is_self_contained(linreg_run):
    page, data = report_files(linreg_run)
    for section_id in SECTION_IDS:
        section_html(page, section_id)
        assert section_id in data
    assert 'id="rebuild"' in page and f"pergrad report {linreg_run}" in page
    assert not re.search(r"""src=["']?(https?:|//)""", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) >= 5 and all(src.startswith("data:image/png;base64,") for src in images)


def test_summary_shows_the_final_values_of_metrics_csv(linreg_run):
    page, data = report_files(linreg_run)
    rows = read_csv(linreg_run / "metrics.csv")
    final_loss = float(rows[-1]["loss"])
    last_val = [r for r in rows if r["val_loss"]][-1]
    summary = section_html(page, "summary")
    assert data["summary"]["final"]["loss"] == {"value": final_loss, "step": int(rows[-1]["step"])}
    assert data["summary"]["final"]["val_loss"]["value"] == float(last_val["val_loss"])
    assert number(final_loss) in summary and number(float(last_val["val_loss"])) in summary
    assert data["summary"]["final"]["accuracy"]["value"] is None  # regression: no accuracy
    assert "metrics.csv" in summary and "checkpoint.pt" in summary


def test_advice_follows_the_median_of_the_last_quarter_of_b_simple(linreg_run):
    _, data = report_files(linreg_run)
    rows = read_csv(linreg_run / "metrics.csv")
    logged = [(int(r["step"]), float(r["b_simple"])) for r in rows if r["b_simple"]]
    tail = logged[-math.ceil(len(logged) / 4) :]
    median = float(np.median([b for _, b in tail]))
    advice = data["noise-scale"]
    assert advice["b_simple_median"] == median == 12.0
    assert (advice["first_step"], advice["last_step"]) == (tail[0][0], tail[-1][0])
    assert advice["n_values"] == len(tail) and advice["batch_size"] == 64
    assert advice["verdict"] == "wasteful"  # 64 > 2 × 12
    assert number(median) in advice["message"] and "64" in advice["message"]


def test_digits_report_shows_image_outliers_and_too_small_advice(digits_run):
    page, data = report_files(digits_run)
    assert data["noise-scale"]["verdict"] == "too small"
    outliers = data["outliers"]["examples"]
    norms = [o["norm"] for o in outliers]
    assert len(outliers) == OUTLIERS and norms == sorted(norms, reverse=True)
    assert norms[0] == pytest.approx(data["norms"]["at_theta"]["max"])
    cards = section_html(page, "outliers")
    assert cards.count('<div class="card">') == OUTLIERS and cards.count("data:image/png") == OUTLIERS
    for o in outliers:
        assert f"#{o['index']}" in cards and 0 <= o["target"] < 10 and 0 <= o["prediction"] < 10


def test_norms_at_theta_and_logged_quantiles(linreg_run):
    page, data = report_files(linreg_run)
    norms = data["norms"]
    at = norms["at_theta"]
    assert at["q10"] <= at["q50"] <= at["q90"] <= at["max"]
    assert norms["logged"]["q50"] == float(read_csv(linreg_run / "metrics.csv")[-1]["norm_q50"])
    assert number(at["q50"]) in section_html(page, "norms")
    table = section_html(page, "outliers")
    assert 'id="outlier-table"' in table and f"<td class=num>{data['outliers']['examples'][0]['index']}</td>" in table


def test_unbiasedness_measured_matches_predicted(linreg_run):
    page, data = report_files(linreg_run)
    check = data["unbiasedness"]
    n = check["n_examples"]
    assert not check["subsampled"] and n == check["n_train"]
    assert check["autograd_max_diff"] < 1e-10
    assert [r["batch_size"] for r in check["rows"]] == batch_sizes_for_check(n, 64)
    for row in check["rows"]:
        if row["batch_size"] <= n // 4:
            assert 0.7 < row["ratio"] < 1.3, row
        assert abs(row["z"]) < 5, row
        # the mean of the draws is as close to ∇C as chance allows, no closer and no farther
        assert row["mean_rel_error"] < 4 * row["chance_rel_error"], row
    convergence = check["convergence"]
    assert convergence[-1]["rel_error"] < convergence[0]["rel_error"] / 5
    table = section_html(page, "unbiasedness")
    assert 'id="unbiasedness-table"' in table and f"{check['rows'][0]['ratio']:.3f}" in table


def test_sampling_errors_from_the_gram_matrix_equal_the_direct_computation():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(30, 7, generator=gen, dtype=torch.float64) + 0.3
    original = grads.clone()
    full, gram = center_and_gram(grads)
    torch.testing.assert_close(full, original.mean(0), atol=1e-12, rtol=0)
    selection = draw_batches(30, 5, 40, gen)
    assert torch.equal(selection.sum(1), torch.full((40,), 5.0))  # 5 distinct examples each
    direct = torch.stack([(original[row.bool()].mean(0) - full).square().sum() for row in selection])
    torch.testing.assert_close(sampling_errors(gram, selection), direct, atol=1e-12, rtol=0)


def test_predicted_sampling_error_is_the_exact_mean_over_every_batch():
    """The prediction against brute force: ‖ḡ_S − ∇C‖² averaged over all C(8, B) batches S."""
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(8, 3, generator=gen, dtype=torch.float64) + 0.5
    full = grads.mean(0)
    check = check_unbiasedness(grads.clone(), full, n_train=8, run_batch_size=3, generator=gen, draws=10)
    assert [row.batch_size for row in check.rows] == [1, 2, 3, 4]
    for row in check.rows:
        batches = itertools.combinations(range(8), row.batch_size)
        exact = np.mean([float((grads[list(s)].mean(0) - full).square().sum()) for s in batches])
        assert row.predicted == pytest.approx(exact, rel=1e-12)


def test_large_problems_use_a_subset_and_say_so(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(examples_for_check(100, 10, gen), torch.arange(100))
    subset = examples_for_check(1000, MAX_ENTRIES // 500, gen)
    assert len(subset) == 500 and torch.equal(subset, subset.unique())
    run = make_run(tmp_path / "run", "linear", "linreg", 64, LINREG_B_SIMPLE, steps=60)
    monkeypatch.setattr("pergrad.report.unbiasedness.MAX_ENTRIES", 17 * 300)
    build_report(run)
    page, data = report_files(run)
    check = data["unbiasedness"]
    assert check["subsampled"] and check["n_examples"] == 300 and len(check["subset"]) == 300
    assert "random subset of N = 300" in section_html(page, "unbiasedness")


@pytest.mark.parametrize(
    "values, batch_size, verdict",
    [
        ([100.0] * 8, 32, "too small"),
        ([40.0] * 8, 32, "about right"),
        ([10.0] * 8, 32, "wasteful"),
        ([math.inf] * 8, 32, "too small"),
        ([1000.0] * 12 + [10.0, math.nan, 10.0, 10.0, 10.0], 32, "wasteful"),  # only the tail counts
        ([math.nan] * 5, 32, "unknown"),
    ],
)
def test_advice_verdicts(values, batch_size, verdict):
    b = np.array(values)
    steps = np.arange(1, len(b) + 1) * 10
    advice = advise_batch_size(steps, b, b / 2, b * 2, batch_size)
    assert advice.verdict == verdict
    if verdict != "unknown":
        assert advice.n_values == math.ceil(np.count_nonzero(~np.isnan(b)) / 4)
        assert advice.last_step == steps[~np.isnan(b)][-1]


def run_cli(capsys, run_dir) -> tuple[int, str, str]:
    """Run ``pergrad report RUN_DIR`` in-process; return (exit code, stdout, stderr)."""
    code = main(["report", str(run_dir)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_the_report_path(linreg_run, capsys):
    code, out, err = run_cli(capsys, linreg_run)
    assert code == 0, err
    assert out.strip() == str(linreg_run / "report.html")


def _corrupt_checkpoint(run: Path) -> None:
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")


def _corrupt_metrics(run: Path) -> None:
    (run / "metrics.csv").write_text("step,loss\n1,abc\n")


def _other_model(run: Path) -> None:
    config = TrainConfig.load(run / "config.toml").replace(model="mlp")
    config.save(run / "config.toml")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: shutil.rmtree(run), "does not exist"),
        (lambda run: (run / "metrics.csv").unlink(), "metrics.csv is missing"),
        (lambda run: (run / "config.toml").unlink(), "config.toml does not exist"),
        (lambda run: (run / "checkpoint.pt").unlink(), "no checkpoint"),
        (_corrupt_checkpoint, "corrupt or not a checkpoint"),
        (_corrupt_metrics, "not a metrics file"),
        (lambda run: (run / "metrics.csv").write_text("step,loss\n"), "has no rows"),
        (_other_model, "do not fit the model"),
    ],
)
def test_unusable_run_directories_give_one_line_errors(linreg_run, tmp_path, capsys, damage, message):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "metrics.csv", "checkpoint.pt"):
        shutil.copy(linreg_run / name, run / name)
    damage(run)
    code, out, err = run_cli(capsys, run)
    assert code == 2 and out == ""
    assert message in err and err.startswith("pergrad report: error: ") and len(err.strip().splitlines()) == 1
    assert not (run / "report.html").exists() and not (run / "report_data.json").exists()
    with pytest.raises(ReportError):
        build_report(run)


def test_train_then_report_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--quiet", "--model", "linear", "--dataset", "linreg", "--epochs", "1", "--log-every", "4"]
    code = main(["train", *argv, "--out", str(run)])
    out = capsys.readouterr().out
    assert code == 0 and f"report: {run / 'report.html'}" in out
    page, data = report_files(run)
    rows = read_metrics(run / "metrics.csv")
    assert data["summary"]["final"]["loss"] == {"value": rows[-1]["loss"], "step": rows[-1]["step"]}
    assert number(rows[-1]["loss"]) in section_html(page, "summary")
    logged = [r["b_simple"] for r in rows if r["b_simple"] is not None]
    median = float(np.median(logged[-math.ceil(len(logged) / 4) :]))
    assert float(data["noise-scale"]["b_simple_median"]) == median  # JSON writes ∞ as "inf"
    for name, value in data["snr"]["last"].items():
        values = [r[f"snr/{name}"] for r in rows if r.get(f"snr/{name}") is not None]
        assert (None if value is None else float(value)) == (values[-1] if values else None)
    assert all(0.7 < r["ratio"] < 1.3 for r in data["unbiasedness"]["rows"] if r["batch_size"] <= 64)

    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").exists()


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium (Debian's package; ``make test`` installs it when missing), offline."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium is missing: run 'make test', which installs it (apt-get install chromium)")
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)


def _white_runs(column: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in a (rows,) bool column."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], column.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@pytest.mark.slow
def test_headless_screenshot_of_a_digits_report_shows_every_section(digits_run, tmp_path):
    """Chromium renders the report: the DOM has every section in order, and the screenshot shows a
    dark header, then one white card per section, each with text, and figures in colour."""
    from matplotlib.image import imread

    page = (digits_run / "report.html").as_uri()
    dom = _chromium("--dump-dom", page, profile=tmp_path / "profile").stdout
    rendered = re.findall(r'<section id="([^"]+)"><h2>([^<]*)</h2>', dom)
    assert [r for r in rendered if r[0] in dict(SECTIONS)] == list(SECTIONS)

    png, height = tmp_path / "report.png", 12000
    _chromium(f"--window-size=1280,{height}", f"--screenshot={png}", page, profile=tmp_path / "profile")
    pixels = imread(png)[..., :3]  # (height, 1280, 3) in [0, 1]
    assert pixels.shape[:2] == (height, 1280)
    assert np.allclose(pixels[20, 640], [0x14 / 255, 0x27 / 255, 0x3A / 255], atol=0.02)  # the dark header
    background = pixels[-1, 0]
    content = np.flatnonzero((np.abs(pixels - background).max(-1) > 0.03).any(1))
    assert content.max() < height - 100, "the page is longer than the screenshot: raise its height"
    white = (pixels > 0.99).all(-1)  # (height, 1280)
    inside = int(np.argmax(white[: content.max()].mean(0) > 0.5)) + 4  # a column just inside the cards
    cards = [(a, b) for a, b in _white_runs(white[:, inside]) if b - a > 100]
    assert len(cards) == len(rendered)  # one card per section, in page order
    for (a, b), (section_id, _) in zip(cards, rendered):
        card = pixels[a:b, inside : 1280 - inside]
        assert (~white[a:b, inside : 1280 - inside]).mean() > 0.02, f"section {section_id} is blank"
        colour = (card.max(-1) - card.min(-1) > 0.3).mean()  # saturated pixels: lines and bars of figures
        if section_id in ("curves", "noise-scale", "snr", "norms", "unbiasedness"):
            assert colour > 2e-3, f"section {section_id} shows no figure"  # 8e-4 for text and links alone
