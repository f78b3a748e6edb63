"""The layer contract: import-linter keeps the package's layers, and it can fail.

Each check runs ``lint-imports`` on a copy of the package (so the working tree is never
touched): the copy as it is must keep every contract; the same copy with one deliberate
upward import, a lazy one inside a function, or an import cycle inside a package must break
the named contract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

FMGEN = ROOT / "fmgen"


def lint_copy(tmp_path, edit: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    shutil.copytree(FMGEN, tmp_path / "fmgen", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if edit is not None:
        module, line = edit
        f = tmp_path / "fmgen" / module
        f.write_text(f.read_text() + "\n" + line + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, not the installed package
    exe = shutil.which("lint-imports") or pytest.fail("import-linter is not installed (dev extra)")
    return subprocess.run([exe, "--no-cache"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_package_keeps_its_contracts(tmp_path):
    r = lint_copy(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("core/paths.py", "import fmgen.config", "layers"),
        ("models/flow.py", "def _later():\n    from fmgen.train import train", "layers"),
        ("data/loader.py", "def _later():\n    import fmgen.cli", "layers"),
        ("eval/fid.py", "def _later():\n    from fmgen.eval import reports", "no cycles"),
        ("core/samplers.py", "import accelerate", "core is pure math"),
    ],
)
def test_a_deliberate_bad_import_breaks_the_contract(tmp_path, module, line, broken):
    r = lint_copy(tmp_path, (module, line))
    assert r.returncode != 0
    assert re.search(rf"{re.escape(broken)}.*BROKEN", r.stdout), r.stdout[-3000:]


def test_nothing_imports_the_command_line_and_the_loop_knows_no_data_set():
    """Outside fmgen/cli, only the `python -m` entry shims import fmgen.cli."""
    shims = {FMGEN / "evaluate.py", FMGEN / "ema.py", FMGEN / "data" / "__main__.py"}
    for f in FMGEN.rglob("*.py"):
        if FMGEN / "cli" in f.parents or f in shims:
            continue
        assert not re.search(r"^\s*(from|import) fmgen\.cli", f.read_text(), re.M), f
    loop = (FMGEN / "train" / "loop.py").read_text()
    assert "digits" not in loop.lower()


def test_the_top_level_package_exports_the_math():
    code = (
        "from fmgen import get_path, Oracle, get_sampler, time_grid, nfe, PATHS, SAMPLERS, get_loss"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
