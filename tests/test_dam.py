"""The decoder attention map (models/dam.py): where each sampling point's weight lands on the token grid,
the scoring network's top-k targets and the DAM coverage metrics, checked by hand on non-square levels."""
import pytest
import torch

from models.dam import attention_map_to_token_grid, dam_coverage, topk_token_targets

# Two levels wider than tall: 2x5 (tokens 0-9) and 1x3 (tokens 10-12).
SHAPES = torch.tensor([[2, 5], [1, 3]])
STARTS = torch.tensor([0, 10])


def splat(points: list[tuple[int, float, float, float]]) -> torch.Tensor:
    """The DAM of one image and one query, head and layer: ``points`` are (level, x, y, weight), with x and y
    normalised to the level."""
    locations = torch.zeros(1, 1, 1, 1, 2, len(points), 2, dtype=torch.float64)
    weights = torch.zeros(1, 1, 1, 1, 2, len(points), dtype=torch.float64)
    for p, (level, x, y, weight) in enumerate(points):
        locations[0, 0, 0, 0, level, p] = torch.tensor([x, y])
        weights[0, 0, 0, 0, level, p] = weight
    return attention_map_to_token_grid(SHAPES, STARTS, locations, weights)[0]


def test_a_point_on_a_grid_node_lands_on_that_token():
    # x = 3 / W, y = 1 / H on level 0 is grid node (3, 1): token 1 * W + 3 = 8.
    masses = splat([(0, 3 / 5, 1 / 2, 0.7), (1, 2 / 3, 0.0, 0.3)])
    expected = torch.zeros(13, dtype=torch.float64)
    expected[8], expected[10 + 2] = 0.7, 0.3
    torch.testing.assert_close(masses, expected)


def test_a_point_between_nodes_splits_bilinearly_and_drops_what_falls_outside():
    # Grid (x, y) = (0.5 * 5, 0.25 * 2) = (2.5, 0.5): tokens 2, 3, 7, 8 take 1/4 each.
    masses = splat([(0, 0.5, 0.25, 1.0)])
    expected = torch.zeros(13, dtype=torch.float64)
    expected[[2, 3, 7, 8]] = 0.25
    torch.testing.assert_close(masses, expected)
    # Grid (4.5, 1.5) on level 0: only node (4, 1), token 9, is inside; it takes (1 - 0.5) * (1 - 0.5).
    masses = splat([(0, 0.9, 0.75, 1.0)])
    assert masses.sum().item() == pytest.approx(0.25) and masses[9].item() == pytest.approx(0.25)


def test_topk_targets_pick_each_images_own_count_and_never_padding():
    attention_map = torch.tensor([[0.1, 0.9, 0.5, 0.7], [5.0, 0.2, 0.3, 0.4]])
    padding = torch.tensor([[False, False, False, False], [True, False, False, False]])
    targets = topk_token_targets(attention_map, padding, torch.tensor([2, 1]))
    assert targets.tolist() == [[0, 1, 0, 1], [0, 0, 0, 1]]


def test_dam_coverage_overall_and_per_level():
    attention_map = torch.tensor([[1.0] * 10 + [2.0, 3.0, 5.0]])
    overall, level0, level1 = dam_coverage(torch.tensor([[0, 12]]), attention_map, SHAPES)
    assert overall.item() == pytest.approx(6 / 20)
    assert level0.item() == pytest.approx(1 / 10) and level1.item() == pytest.approx(5 / 10)


def test_topk_targets_with_ties_at_the_minimum_never_take_padding():
    """Catches padding filled with the map's minimum (not below it): where the valid minimum is 0 and an image's
    count exceeds its non-zero tokens, padding then ties with valid zeros and can take their places. Padding
    leads one row and trails the next, so that neither tie order saves the bug. The last row's count (valid + 2,
    as rho = 1 gives valid + 1) exceeds its valid tokens: it takes those, no padding."""
    attention_map = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.3, 0.0],
                                  [0.2, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0],
                                  [0.0, 0.7, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0]])
    padding = torch.tensor([[True, True, True, False, False, False, False, False],
                            [False, False, False, False, False, True, True, True],
                            [False, False, True, True, False, False, False, True]])
    counts = torch.tensor([4, 3, 7], dtype=torch.int32)
    targets = topk_token_targets(attention_map, padding, counts)
    assert targets.sum(1).tolist() == [4, 3, 5]  # min(count, valid tokens): 5 valid in each row
    assert not targets[padding].any()
    assert (targets[attention_map > 0] == 1).all()  # the non-zero tokens first
    assert targets[2].tolist() == [1, 1, 0, 0, 1, 1, 1, 0]
