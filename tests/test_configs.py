"""configs/*.sh set only flags and --output_dir, forward extra arguments, and parse."""
import os
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
