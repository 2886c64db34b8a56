"""Multi-scale deformable attention against a naive loop, gradients, boundaries."""
import pytest
import torch

from models.ops import MSDeformAttn, implementation, ms_deform_attn, ms_deform_attn_pytorch
from models.ops.ms_deform_attn_func import ms_deform_attn_gather

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """One bilinear sample at a time: x * W - 0.5 in pixel units, zeros outside the map."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    starts = [0]
    for h, w in spatial_shapes.tolist():
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
                    level_value = value[b, starts[lvl]:starts[lvl + 1], m].view(h, w, dim)
                    for p in range(points):
                        x = sampling_locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = sampling_locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        sample = torch.zeros(dim, dtype=value.dtype)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                sample += (1 - abs(x - xi)) * (1 - abs(y - yi)) * level_value[yi, xi]
                        out[b, q, m] += attention_weights[b, q, m, lvl, p] * sample
    return out.flatten(2)


def random_inputs(batch=2, heads=2, dim=4, queries=5, points=3, shapes=((4, 6), (2, 3), (1, 1)),
                  dtype=torch.float64, device="cpu", spread=(-0.2, 1.2)):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(spatial_shapes.prod(1).sum())
    g = torch.Generator().manual_seed(0)
    value = torch.randn(batch, tokens, heads, dim, generator=g, dtype=torch.float64)
    low, high = spread
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=torch.float64)
    locations = locations * (high - low) + low
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(value), spatial_shapes, level_start_index, cast(locations), cast(weights)


def test_matches_naive_loop_including_out_of_range_locations():
    value, shapes, starts, locations, weights = random_inputs()
    expected = naive_ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights), expected)


def test_boundary_locations():
    """Exact corners, edges and far-outside points: outside contributes zero, edges are half-weighted."""
    value, shapes, starts, locations, weights = random_inputs(queries=4, points=2)
    edges = torch.tensor([0.0, 1.0, -5.0, 5.0, 0.5, 1e-9], dtype=torch.float64)
    locations = edges[torch.randint(0, len(edges), locations.shape, generator=torch.Generator().manual_seed(1))]
    expected = naive_ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights), expected)
    far = torch.full_like(locations, 3.0)
    assert ms_deform_attn(value, shapes, starts, far, weights).abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    value, shapes, starts, locations, weights = random_inputs(batch=1, queries=2, points=2, device=device,
                                                              spread=(0.05, 0.95))
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn(v, shapes, starts, l, w), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_close_to_float64(device, dtype, tolerance):
    if device == "cpu" and dtype == torch.float16 and not _cpu_half_grid_sample():
        pytest.skip("this PyTorch build has no float16 grid_sample on CPU")
    args64 = random_inputs(device=device)
    expected = ms_deform_attn_pytorch(args64[0], args64[1], args64[3], args64[4])
    value, shapes, starts, locations, weights = random_inputs(device=device, dtype=dtype)
    actual = ms_deform_attn(value, shapes, starts, locations, weights)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


def _cpu_half_grid_sample() -> bool:
    try:
        torch.nn.functional.grid_sample(torch.zeros(1, 1, 2, 2, dtype=torch.float16),
                                        torch.zeros(1, 1, 1, 2, dtype=torch.float16), align_corners=False)
        return True
    except RuntimeError:
        return False


def test_module_shapes_and_reference_boxes():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(2, 26, 16)
    query = torch.randn(2, 7, 16)
    for ref in (torch.rand(2, 7, 2, 2), torch.rand(2, 7, 2, 4)):
        out, locations, weights = attn(query, ref, value, shapes, starts, torch.zeros(2, 26, dtype=torch.bool))
        assert out.shape == (2, 7, 16)
        assert locations.shape == (2, 7, 2, 2, 3, 2)
        torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 7, 2))


def test_padding_tokens_do_not_contribute():
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=4)
    shapes, starts = torch.tensor([[3, 3]]), torch.tensor([0])
    value, query, ref = torch.randn(1, 9, 8), torch.randn(1, 2, 8), torch.rand(1, 2, 1, 2)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 4] = True
    out1, _, _ = attn(query, ref, value, shapes, starts, mask)
    value[0, 4] = 1e6  # changing a padded token changes nothing
    out2, _, _ = attn(query, ref, value, shapes, starts, mask)
    torch.testing.assert_close(out1, out2)


# ----------------------------------------------------------------------------------------------
# The gather path (--deterministic on CUDA)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_path_matches_the_naive_loop_and_passes_gradcheck(device):
    value, shapes, _, locations, weights = random_inputs(device=device)
    expected = naive_ms_deform_attn(value.cpu(), shapes.cpu(), locations.cpu(), weights.cpu())
    torch.testing.assert_close(ms_deform_attn_gather(value, shapes, locations, weights).cpu(), expected)
    value, shapes, _, locations, weights = random_inputs(batch=1, queries=2, points=2, device=device,
                                                         spread=(0.05, 0.95))
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_gather(v, shapes, loc, w), inputs)


def test_deterministic_mode_keeps_the_cpu_paths_and_switches_cuda_to_gather():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert implementation("cpu") in ("kernel", "pytorch")  # both deterministic on the CPU
        assert implementation("cuda") == "gather"
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backward_is_bitwise_repeatable_in_deterministic_mode():
    """Many queries sampling the same few pixels: atomicAdd accumulation would vary from run to run."""
    value, shapes, starts, locations, weights = random_inputs(batch=2, heads=2, dim=32, queries=3000, points=4,
                                                              shapes=((4, 4), (2, 2)), dtype=torch.float32,
                                                              device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            leaf = value.clone().requires_grad_()
            ms_deform_attn(leaf, shapes, starts, locations, weights).sum().backward()
            grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])


def test_pixel_offsets_are_normalised_by_each_levels_width_and_height():
    """A 2-d reference point moves by (dx / W_l, dy / H_l) for an offset of (dx, dy) pixels: on levels wider
    than tall, dividing by (H, W) instead would move it elsewhere."""
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=1, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 2.0, 3.0, -1.0]))  # (dx, dy) per level
    shapes, starts = torch.tensor([[2, 8], [3, 5]]), torch.tensor([0, 16])
    ref = torch.full((1, 1, 2, 2), 0.5)
    _, locations, _ = attn(torch.randn(1, 1, 8), ref, torch.randn(1, 31, 8), shapes, starts)
    expected = torch.tensor([[0.5 + 1 / 8, 0.5 + 2 / 2], [0.5 + 3 / 5, 0.5 - 1 / 3]])
    torch.testing.assert_close(locations[0, 0, 0, :, 0], expected)
