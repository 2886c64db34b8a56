"""util.process.keep_freed_memory: large CPU tensors reuse freed memory instead of being page-faulted afresh."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Page faults while a 64 MiB tensor is allocated, written and freed 3 times, after 10 such rounds. In the
# first few the heap still grows: a freed block is reused once a free one fits it with its alignment padding.
COUNT_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from util.process import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        sys.exit("no glibc mallopt")
    for _ in range(10):
        torch.empty(16 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(16 * 2**20).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", COUNT_FAULTS, mode], cwd=ROOT, capture_output=True, text=True)
    if "no glibc mallopt" in run.stderr:
        pytest.skip("this C library has no mallopt (not glibc)")
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_removes_the_page_faults_of_large_tensors():
    kept = page_faults("keep")
    assert kept < 100
    # 64 MiB is 16,384 pages of 4 KiB: glibc unmaps each tensor and faults every page of the next one in
    # (fewer with transparent huge pages always on, still many more than with the memory kept).
    assert page_faults("system") > 10 * max(kept, 1)
