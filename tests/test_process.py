"""util.process.keep_freed_memory: large CPU tensors reuse freed memory instead of being page-faulted afresh."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Page faults while a 64 MiB tensor is allocated, written and freed, after one such tensor was already freed.
COUNT_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from util.process import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.empty(16 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", COUNT_FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_removes_the_page_faults_of_large_tensors():
    # 64 MiB is 16,384 pages of 4 KiB: glibc unmaps the first tensor and faults every page of the second in.
    assert page_faults("system") > 10_000
    assert page_faults("keep") < 100
