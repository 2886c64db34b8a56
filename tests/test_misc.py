"""util/misc.py: small tensor helpers with exact values."""
import math

import pytest
import torch

from util.misc import inverse_sigmoid


def test_inverse_sigmoid_inverts_the_sigmoid_inside_the_clamp():
    x = torch.tensor([1e-4, 0.01, 0.3, 0.5, 0.9, 1 - 1e-4], dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x), torch.logit(x))
    assert inverse_sigmoid(torch.tensor(1e-4, dtype=torch.float64)).item() == pytest.approx(-9.2102, abs=1e-4)


def test_inverse_sigmoid_clamps_each_term_at_1e_5_as_the_reference():
    values = inverse_sigmoid(torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    low, high = math.log(1e-5), -math.log(1e-5)
    torch.testing.assert_close(values, torch.tensor([low, low, high, high], dtype=torch.float64))
