import sys
from pathlib import Path

import pytest
import torch

# Tests import the project (main, models, util) and the helpers next to them (reference).
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


# The compiled deformable-attention kernels (tests/test_ms_deform_attn_*.py): built on first use; skipped where
# the machine cannot build them, a failure where the build breaks.
@pytest.fixture(scope="module")
def cpu_kernel():
    from msda_kernel_helpers import require_kernel
    require_kernel("cpu")
    return torch.ops.sparse_detr.ms_deform_attn


@pytest.fixture(scope="module")
def cuda_kernel():
    from msda_kernel_helpers import require_kernel
    require_kernel("cuda")
    return torch.ops.sparse_detr.ms_deform_attn
