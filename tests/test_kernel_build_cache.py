"""models/ops/_extension.py: the compiled kernel's build cache is shared by every clone of the same sources.

Bug caught (issue #29): the cache folder was keyed by the sources' hash, but build.ninja named the checkout
(``-I<checkout>/models/ops/csrc`` and the source paths), so two clones used in turn rebuilt the kernel on every
switch (11-34 s per start of main.py, predict.py or the API).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.ops import _extension

ROOT = Path(__file__).resolve().parents[1]
LOAD = ("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); "
        "from models.ops import _extension; status = _extension.load('cpu'); print('STATE', status.state); "
        "print('LIBRARY', status.library)")


def clone(folder: Path) -> Path:
    """A copy of the checkout's kernel package (models/ops, under an empty models package)."""
    shutil.copytree(ROOT / "models" / "ops", folder / "models" / "ops", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "models" / "__init__.py").write_text("")
    return folder


def load_in(folder: Path, cache: Path) -> tuple[str, str]:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "MSDA_IMPL": "auto", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", LOAD], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("STATE", "LIBRARY")))
    assert lines["STATE"] == "loaded", result.stderr[-3000:]
    return lines["LIBRARY"], result.stderr


@pytest.mark.skipif(bool(_extension.missing_prerequisites("cpu")), reason="the CPU kernel cannot be built here")
def test_two_clones_used_in_turn_share_one_build(tmp_path):
    """One build (announced on one line), then clone B and clone A again load it as it is: same library file,
    not rewritten, no second build line."""
    cache = tmp_path / "extensions"
    first, second = clone(tmp_path / "a"), clone(tmp_path / "b")
    library, log = load_in(first, cache)
    built = [line for line in log.splitlines() if "building the CPU kernel" in line]
    assert len(built) == 1 and "once, about 20 s" in built[0], log
    stamp = Path(library).stat().st_mtime_ns
    build_file = (Path(library).parent / "build.ninja").read_text()
    # The command names no checkout's sources (torch's headers may sit in a .venv inside the checkout: CI's).
    assert str(first) not in build_file and str(ROOT / "models") not in build_file
    for folder in (second, first):
        again, log = load_in(folder, cache)
        assert again == library and "building" not in log, log
        assert Path(library).stat().st_mtime_ns == stamp, f"{folder.name} rebuilt the kernel"
