"""The wheel builds, installs into a fresh venv beside torch, and works there.

Offline and quick: the wheel is built without build isolation (setuptools and build come with the
test extra), and the fresh venv sees the test venv's packages (torch and the rest) through a .pth
file, while pergrad itself comes from the wheel alone (the test venv's editable install is not
seen: a path added by a .pth file is not scanned for further .pth files).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_installs_beside_torch_and_works(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools' build/ left in the checkout could add stale files
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("pergrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pergrad/py.typed" in names and "pergrad/rules/linear.py" in names
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch and the rest
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel)

    code = (
        "import pergrad, pergrad.rules, pergrad.stats, pergrad.distributed, pergrad.checks\n"
        "from pergrad import PerExample, DistributedPerExample, NoiseScale, ParamSNR, register_rule, Rule\n"
        "from pergrad.integrations.lightning import PergradCallback\n"
        "from pergrad.integrations.transformers import PergradCallback\n"
        "import torch\n"
        "m = torch.nn.Linear(3, 2)\n"
        "with PerExample(m) as pe:\n"
        "    r = pe.backward(m(torch.randn(4, 3)).square().sum(1))\n"
        "assert r.sq_norms.shape == (4,)\n"
        "print(pergrad.__file__)\n"
    )
    where = Path(_run(python, "-c", code, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert where.is_relative_to(env_dir), f"pergrad imported from {where}, not from the wheel"
    assert (where.parent / "py.typed").is_file()

    shown = _run(env_dir / "bin" / "pergrad", "--help", cwd=tmp_path).stdout
    assert "usage: pergrad" in shown and "train" in shown and "report" in shown
