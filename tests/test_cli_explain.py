"""``pergrad explain``: the printed numbers, the picture, bad input, determinism."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from pergrad._atomic import savefig_atomic, write_atomic
from pergrad.cli import explain
from pergrad.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABEL_WIDTH = 16  # the width of the table's row labels in explain.format_report
NUMBERS = re.compile(r"[-+]?\d+\.\d+")


def run_explain(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``pergrad explain ARGS`` in-process; return (exit code, stdout, stderr)."""
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(stdout: str) -> dict[str, list[float]]:
    """The report's table: row label -> [loss (absent in the autograd row), gradient...]."""
    rows = {}
    for line in stdout.splitlines():
        label, cells = line[:LABEL_WIDTH].strip(), line[LABEL_WIDTH:]
        if label and cells.strip() and not re.search(r"[^-+0-9. ]", cells):
            rows[label] = [float(v) for v in NUMBERS.findall(cells)]
    return rows


@pytest.mark.parametrize("k", [2, 3, 4])
def test_average_of_per_example_gradients_equals_autograd(tmp_path, capsys, k):
    code, out, err = run_explain(capsys, "--out", str(tmp_path), "--examples", str(k))
    assert code == 0, err
    rows = table(out)
    examples = [v for label, v in rows.items() if label.startswith("∇ℓ  example #")]
    assert len(examples) == k
    assert all(len(v) == 6 for v in examples)  # loss, 4 weights, bias

    average, autograd = rows["(1/B) Σ ∇ℓᵢ"], rows["∇ (1/B) Σ ℓᵢ"]
    assert len(average) == 6 and len(autograd) == 5  # the autograd row has no loss cell
    examples, average, autograd = (
        torch.tensor(v, dtype=torch.float64) for v in (examples, average, autograd)
    )
    # Printed to 5 decimals: averaging rounded numbers moves the last digit by at most one.
    torch.testing.assert_close(average, examples.mean(0), atol=1.1e-5, rtol=0)
    torch.testing.assert_close(autograd, average[1:], atol=1.1e-5, rtol=0)

    max_diff = float(re.search(r"max \|difference\| = (\S+)", out).group(1))
    assert max_diff < 1e-12


def test_batch_gradients_match_closed_form():
    # f(x) = w·x + b, ℓ = ½(f(x) − y)²: ∇_w ℓ = (f(x) − y) x and ∇_b ℓ = f(x) − y.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(7, generator=generator, dtype=torch.float64)
    model = nn.Linear(4, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=generator, dtype=torch.float64))
        model.bias.fill_(0.3)

    batch = explain.batch_gradients(model, x, y)

    residual = (x @ model.weight.detach().squeeze(0) + 0.3 - y).unsqueeze(1)  # (n, 1)
    expected = residual * torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1)  # (n, 5)
    assert batch.labels == ["weight[0]", "weight[1]", "weight[2]", "weight[3]", "bias"]
    torch.testing.assert_close(batch.per_example, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(batch.losses, 0.5 * residual.squeeze(1) ** 2, atol=1e-10, rtol=0)
    torch.testing.assert_close(batch.autograd, expected.mean(0), atol=1e-10, rtol=0)


def test_the_pictures_optimum_is_the_least_squares_line():
    """The closed form the picture uses against the normal equations solved independently,
    on the picture's data and on a line whose minimum is known exactly."""
    x, y = explain.regression_data(explain.LINE_TRUE[:1], explain.LINE_TRUE[1], x_mean=1.0)
    design = torch.cat([x, torch.ones_like(x)], 1)  # (N, 2)
    normal = torch.linalg.solve(design.T @ design, design.T @ y)
    torch.testing.assert_close(torch.from_numpy(explain._line_fit(x.squeeze(1), y)), normal, atol=1e-12, rtol=0)

    exact = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert explain._line_fit(exact, 3 * exact - 2).tolist() == [3.0, -2.0]


def test_writes_a_png_and_prints_its_path(tmp_path, capsys):
    out_dir = tmp_path / "new" / "dir"
    code, out, err = run_explain(capsys, "--out", str(out_dir))
    assert code == 0, err
    png = out_dir / "explain.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert list(out_dir.iterdir()) == [png]  # no temporary file left behind
    assert out.rstrip().endswith(str(png))
    assert "unbiased estimate of the full-data gradient" in out


def test_same_seed_same_output_other_seed_other_batch(tmp_path, capsys):
    first = run_explain(capsys, "--out", str(tmp_path), "--seed", "7")
    png = (tmp_path / "explain.png").read_bytes()
    second = run_explain(capsys, "--out", str(tmp_path), "--seed", "7")
    assert first == second
    assert (tmp_path / "explain.png").read_bytes() == png

    other = run_explain(capsys, "--out", str(tmp_path), "--seed", "8")
    assert other[1] != first[1]


@pytest.mark.parametrize("k", ["1", "5", "9", "-3", "two"])
def test_examples_out_of_range_is_a_usage_error(tmp_path, capsys, k):
    out_dir = tmp_path / "out"
    code, out, err = run_explain(capsys, "--examples", k, "--out", str(out_dir))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "--examples" in err and "from 2 to 4" in err and f"'{k}'" in err
    assert not out_dir.exists()


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, out, err = run_explain(capsys, "--out", str(blocker / "sub"))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "--out" in err and "write to" in err
    assert list(tmp_path.iterdir()) == [blocker]


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert main(["explain", "--help"]) == 0
    assert "--examples K" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "pergrad", "explain", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--seed" in done.stdout


def test_atomic_writers_replace_whole_files(tmp_path):
    target = tmp_path / "note.txt"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    with pytest.raises(ValueError):
        savefig_atomic(figure, tmp_path / "note.txt", format="no-such-format")
    assert target.read_bytes() == b"new"  # a failed save leaves the old file
    savefig_atomic(figure, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "plot.png"]


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path):
    """``pergrad explain | head -0``: the pipe is closed before the command prints anything."""
    command = [sys.executable, "-m", "pergrad", "explain", "--out", str(tmp_path / "explain.png")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as done:
        done.stdout.close()
        err = done.stderr.read().decode()
        assert done.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err
