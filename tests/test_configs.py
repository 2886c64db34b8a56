"""configs/*.sh set only flags and --output_dir, forward extra arguments, and parse."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from main import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.sh"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_flags_parse_and_forward_extra_arguments(config):
    # PYTHON=echo prints the command line the config would run.
    result = subprocess.run(["bash", str(config), "--device", "cpu", "--output_dir", "elsewhere"],
                            env={**os.environ, "PYTHON": "echo"}, capture_output=True, text=True, check=True)
    words = result.stdout.split()
    assert words[:2] == ["-u", str(config.parent / ".." / "main.py")] or words[1].endswith("main.py")
    flags = words[2:]
    assert flags[-4:] == ["--device", "cpu", "--output_dir", "elsewhere"]
    assert flags[0] == "--output_dir" and flags[1] == f"exps/{config.stem}"
    args = parse_args(flags)
    assert args.output_dir == "elsewhere"


def test_each_readme_row_quotes_the_schedule_its_config_runs():
    """The model-zoo table's "N epochs" is what the config trains, so the quoted AP is that of the run it gives."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `([\w.]+\.sh)` \| [^|]*?(\d+) epochs[^|]*\| ([^|]*)\|$", readme, flags=re.M)
    assert {name for name, _, _ in rows} >= {"r50_detr.sh", "r50_sdetr.sh", "r50_deformable_detr.sh"}
    for name, epochs, _ in rows:
        result = subprocess.run(["bash", str(CONFIGS[0].parent / name), "--device", "cpu"],
                                env={**os.environ, "PYTHON": "echo"}, capture_output=True, text=True, check=True)
        assert parse_args(result.stdout.split()[2:]).epochs == int(epochs), name
