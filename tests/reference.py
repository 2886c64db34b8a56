"""Loading the reference fixtures (see ../shared/fixtures/README.md) and comparing against them."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from main import get_args_parser, validate_args

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# The fixture sets: the main one pads to a square batch; "nonsquare" to a 96x224 one (see its README section).
FIXTURE_SETS = ("", "nonsquare")


def fixtures_dir(fixture_set: str = "") -> Path | None:
    root = Path(os.environ.get("DETR_FIXTURES", PROJECT_ROOT.parent / "shared" / "fixtures"))
    path = root / fixture_set
    return path if (path / "index.json").is_file() else None


def require_fixtures(fixture_set: str = "") -> Path:
    """The folder of a fixture set; skips the test where it is absent, fails under CI."""
    path = fixtures_dir(fixture_set)
    if path is None:
        where = f"../shared/fixtures/{fixture_set}".rstrip("/")
        if os.environ.get("CI") == "true":
            pytest.fail(f"reference fixtures not found at {where}: set DETR_FIXTURES or place them there")
        pytest.skip(f"reference fixtures not found at {where} (set DETR_FIXTURES)")
    return path


@lru_cache(maxsize=None)
def _weights_file(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@lru_cache(maxsize=None)
def load_fixture(name: str, fixture_set: str = "") -> dict:
    return torch.load(require_fixtures(fixture_set) / f"{name}.pt", map_location="cpu", weights_only=False)


def fixture_state_dict(fixture: dict, fixture_set: str = "") -> dict[str, torch.Tensor]:
    """The reference's state dict for this fixture, in float64 (as the fixture README prescribes). The
    weight files are named relative to the fixture's own folder."""
    folder = require_fixtures(fixture_set)
    pool: dict[str, torch.Tensor] = {}
    for name in fixture["weights_files"]:
        pool.update(_weights_file(str((folder / name).resolve())))
    pool.update(fixture["state_dict_overrides"])
    return {k: pool[k].double() if pool[k].is_floating_point() else pool[k] for k in fixture["state_dict_keys"]}


def fixture_args(fixture: dict, model: str = "deformable"):
    """Our parsed arguments with the reference's fields of this fixture."""
    args = get_args_parser().parse_args(["--model", model, "--device", "cpu"])
    for key, value in fixture["args"].items():
        if hasattr(args, key):
            setattr(args, key, value)
    return validate_args(args)


def build_fixture_model(fixture: dict, model: str = "deformable", fixture_set: str = ""):
    """``build_model`` for this fixture, in float64 with the fixture's weights loaded strictly.

    The backbone is built as pretrained (early layers frozen, as the reference) but its ImageNet
    weights are not fetched: the fixture's weights replace them.
    """
    from unittest import mock

    from models import build_model
    with mock.patch("models.backbone._load_imagenet_weights", return_value=None):
        detector, criterion, postprocessors = build_model(fixture_args(fixture, model))
    detector.double()
    detector.load_state_dict(fixture_state_dict(fixture, fixture_set), strict=True)
    return detector, criterion, postprocessors


def assert_close_tree(actual, expected, path: str = "outputs", rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Recursively compare nested dicts/lists of tensors."""
    if isinstance(expected, dict):
        missing = set(expected) - set(actual)
        assert not missing, f"{path}: missing keys {sorted(missing)}"
        for key in expected:
            assert_close_tree(actual[key], expected[key], f"{path}.{key}", rtol, atol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_tree(a, e, f"{path}[{i}]", rtol, atol)
    elif torch.is_tensor(expected):
        assert tuple(actual.shape) == tuple(expected.shape), f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if expected.is_floating_point():
            torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(actual.to(expected.dtype), expected), f"{path}: values differ"
    else:
        assert actual == expected, f"{path}: {actual} != {expected}"
