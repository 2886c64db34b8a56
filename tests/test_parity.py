"""Parity with the original implementations on their recorded fixtures (../shared/fixtures):
kakaobrain/sparse-detr (Deformable, Efficient, Sparse DETR), facebookresearch/detr, shengwenyuan/sdetr.
Same weights in, same outputs, losses, gradient norms and detections out.

Every model runs on both fixture sets: the main one, whose batch pads to a square 224x224, and
``nonsquare/`` (a 96x224 batch), where any mix-up of height and width changes the numbers."""
import pytest
import torch

from util.misc import nested_tensor_from_tensor_list

from reference import FIXTURE_SETS, assert_close_tree, build_fixture_model, load_fixture

# fixture name -> --model
FIXTURES = {
    "deformable_detr": "deformable",
    "deformable_detr_refine_two_stage": "deformable",
    "efficient_detr": "deformable",
    "sparse_detr_rho0.1": "deformable",
    "sparse_detr_rho0.3": "deformable",
    "detr": "detr",
    "sdetr": "sdetr",
}


def _double_targets(targets):
    return [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]


CASES = [(fixture_set, name) for fixture_set in FIXTURE_SETS for name in FIXTURES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s or 'square'}/{n}" for s, n in CASES])
def run(request):
    """Build the fixture's model with its weights; run forward, losses, backward and post-processing."""
    fixture_set, name = request.param
    fixture = load_fixture(name, fixture_set)
    model, criterion, postprocessors = build_fixture_model(fixture, FIXTURES[name], fixture_set)
    samples = nested_tensor_from_tensor_list([img.double() for img in fixture["images"]])
    model.train()
    outputs = model(samples)
    losses = criterion(outputs, _double_targets(fixture["targets"]))
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    model.eval()
    with torch.no_grad():
        detections = postprocessors["bbox"](model(samples), torch.stack([t["orig_size"] for t in fixture["targets"]]))
    return dict(fixture=fixture, model=model, criterion=criterion, outputs=outputs, losses=losses, total=total,
                detections=detections)


def test_state_dict_layout(run):
    assert list(run["model"].state_dict()) == list(run["fixture"]["state_dict_keys"])


def test_outputs(run):
    assert_close_tree(run["outputs"], run["fixture"]["outputs"], rtol=1e-4, atol=1e-5)


def test_losses(run):
    expected, losses = run["fixture"]["losses"], run["losses"]
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert float(losses[name].detach()) == pytest.approx(value, rel=1e-4, abs=1e-9), name
    assert float(run["total"].detach()) == pytest.approx(run["fixture"]["total_loss"], rel=1e-4)


def test_weight_dict_names_every_loss(run):
    """The criterion returns exactly the weighted losses (plus metrics), weighted as the reference."""
    loss_names = {k for k in run["losses"] if k.startswith("loss_")}
    assert loss_names == set(run["criterion"].weight_dict)
    reference = run["fixture"]["weight_dict"]
    assert {k: reference[k] for k in loss_names} == run["criterion"].weight_dict


def test_gradient_norms(run):
    params = dict(run["model"].named_parameters(remove_duplicate=False))
    for name, expected in run["fixture"]["grad_norms"].items():
        grad = params[name].grad
        actual = 0.0 if grad is None else float(grad.norm())
        assert actual == pytest.approx(expected, rel=1e-3, abs=1e-12), name
    # Parameters the reference gave a gradient are exactly those we give one.
    with_grad = {id(p) for p in run["model"].parameters() if p.grad is not None}
    assert with_grad == {id(params[name]) for name in run["fixture"]["grad_norms"]}


def test_postprocess(run):
    assert len(run["detections"]) == len(run["fixture"]["postprocess"])
    for actual, expected in zip(run["detections"], run["fixture"]["postprocess"]):
        torch.testing.assert_close(actual["scores"].float(), expected["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(actual["labels"], expected["labels"])
        torch.testing.assert_close(actual["boxes"].float(), expected["boxes"], rtol=1e-4, atol=1e-4)
