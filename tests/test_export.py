"""tools/export_onnx.py, models/export.py and models/export_check.py: every variant exports to ONNX and
onnxruntime matches PyTorch at sizes other than the export size; ties at Sparse DETR's top-rho boundary pass the
check and planted errors fail it; the file's metadata round-trip; tools/onnx_predict.py preprocesses as the
pipeline; bad input gives one-line errors."""
import contextlib
import io
import json
import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch

from main import parse_args
from models import build_model
from tiny_flags import EXPORT_TINY, EXPORT_VARIANTS

EXPORT_SIZE = (96, 128)
VERIFY_SIZES = [(80, 160), (160, 96), (112, 136)]  # 20, 23 and 25 kept tokens in Sparse DETR; 19 at 96x128


def export(tmp_path, variant, *extra, model_flags=()):
    from tools.export_onnx import main as export_onnx
    out = tmp_path / f"{variant}.onnx"
    records = export_onnx(["--random_init", "--out", str(out), "--export_size", *map(str, EXPORT_SIZE), "--verify",
                           "--threads", "1", "--verify_sizes", *[str(v) for size in VERIFY_SIZES for v in size],
                           *extra, "--", *EXPORT_TINY, *EXPORT_VARIANTS[variant], *model_flags])
    return out, records


# The Sparse DETR export of the tool that several tests read: padded batches of two, named classes, and the size
# rule 96 / 128 (not the defaults, so that the metadata cannot hold a constant).
SPARSE_NAMES = {1: "triangle", 3: "square", 4: "disc"}
SPARSE_SIZE_RULE = ("--val_size", "96", "--max_size", "128")


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sparse_export")
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps({"categories": [{"id": k, "name": v} for k, v in SPARSE_NAMES.items()]}))
    noise = []  # what the exporter logs (onnxscript: a "Skipping constant folding" warning per Split)
    handler = logging.Handler(logging.WARNING)
    handler.emit = noise.append
    exporter_log = logging.getLogger("onnxscript")
    exporter_log.addHandler(handler)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            out, records = export(tmp_path, "sparse_detr", "--with_mask", "--verify_batch", "2", "--categories",
                                  str(categories), "--opset", "17", model_flags=SPARSE_SIZE_RULE)
    finally:
        exporter_log.removeHandler(handler)
    return out, records, printed.getvalue(), noise


def test_export_prints_its_steps_and_hides_the_exporters_noise(sparse_export):
    """Catches: minutes of export without a word, or the exporter's warnings shown without --verbose."""
    _, _, printed, noise = sparse_export
    assert re.search(r"exporting at 96x128: trace\.\.\. [0-9.]+ s, convert\.\.\. [0-9.]+ s, optimize\.\.\. [0-9.]+ s, "
                     r"write\.\.\. [0-9.]+ s\n", printed), printed
    assert re.search(r"verified: .* at 3 sizes \([0-9.]+ s\)", printed), printed
    assert noise == []


@pytest.mark.parametrize("variant", [v for v in EXPORT_VARIANTS if not v.startswith("sparse_detr")])
def test_every_variant_exports_and_matches_pytorch_at_other_sizes(tmp_path, variant):
    """Catches: a graph that froze the example's H, W (ORT refuses or differs at other sizes), the compiled
    attention kernel in the graph (no ONNX op), a post-processing that does not export. Box refinement takes a
    pixel mask and padded batches of two: every image, padded or not, is held to the tolerance."""
    extra = ["--with_mask", "--verify_batch", "2"] if variant == "refine" else []
    out, records = export(tmp_path, variant, *extra)
    assert out.stat().st_size > 0
    assert [r["size"] for r in records] == VERIFY_SIZES and EXPORT_SIZE not in VERIFY_SIZES
    assert all(r["ok"] and r["logits_diff"] <= 1e-4 and r["boxes_diff"] <= 1e-4 for r in records), records


def test_sparse_detr_kept_count_is_computed_in_the_graph(sparse_export):
    """Catches: Sparse DETR's kept-token count frozen at the export size (as int() in a trace does). Exported with
    a pixel mask and verified on padded batches of two: the count differs between sizes and between the two
    images of one batch (the padded one has fewer valid tokens), and equals PyTorch's everywhere."""
    _, records, _, _ = sparse_export
    assert all(r["ok"] for r in records), records
    assert all("padded_logits_diff" in r for r in records)  # two-stage: padded images reported apart
    counts = [r["onnx_kept_counts"] for r in records]
    assert counts == [r["kept_counts"] for r in records]
    assert len({c[0] for c in counts}) == len(VERIFY_SIZES)  # one count per size
    assert all(c[1] < c[0] for c in counts)  # the padded image keeps fewer
    # The example's own count (a batch of 96x128 images) is none of them: not a constant of the graph.
    args = parse_args(EXPORT_TINY + EXPORT_VARIANTS["sparse_detr"])
    model, _, _ = build_model(args, load_backbone_weights=False)
    with torch.no_grad():
        example = model(torch.randn(1, 3, *EXPORT_SIZE).unbind(0))["sparse_token_nums"].item()
    assert example not in {c[0] for c in counts}


def test_objectness_rule_kept_count_is_computed_in_the_graph(tmp_path):
    """The same for the objectness token-selection rule: its kept count is a graph value too (padded batches of
    two, three sizes), equal to PyTorch's."""
    _, records = export(tmp_path, "sparse_detr_objectness", "--with_mask", "--verify_batch", "2")
    assert all(r["ok"] for r in records), records
    counts = [r["onnx_kept_counts"] for r in records]
    assert counts == [r["kept_counts"] for r in records]
    assert len({c[0] for c in counts}) == len(VERIFY_SIZES) and all(c[1] < c[0] for c in counts)


def run_error(capsys, argv):
    from tools.export_onnx import main as export_onnx
    with pytest.raises(SystemExit) as exit_info:
        export_onnx(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    return message


def test_unknown_variant_gives_one_line(tmp_path, capsys):
    """Catches: an unknown --model or config script ending in a traceback or an argparse usage block."""
    out = str(tmp_path / "m.onnx")
    assert "invalid choice: 'yolo'" in run_error(capsys, ["--random_init", "--out", out, "--", "--model", "yolo"])
    message = run_error(capsys, ["--random_init", "--out", out, "--config", "configs/r50_nope.sh"])
    assert "config script not found" in message and "r50_sparse_detr_rho_0.1.sh" in message
    message = run_error(capsys, ["--random_init", "--out", out, "--", "--rho", "0.1"])
    assert "--rho needs --two_stage" in message


def test_checkpoint_that_does_not_fit_gives_one_line(tmp_path, capsys):
    """Catches: a checkpoint of another variant loaded partly, or its many-line key listing as the error."""
    args = parse_args(EXPORT_TINY)
    model, _, _ = build_model(args, load_backbone_weights=False)
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")  # official-style: weights only
    message = run_error(capsys, ["--resume", str(tmp_path / "plain.pth"), "--out", str(tmp_path / "m.onnx"), "--",
                                 *EXPORT_TINY, "--with_box_refine"])
    assert "do not fit" in message and "--with_box_refine differs" in message
    message = run_error(capsys, ["--resume", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx")])
    assert "checkpoint not found" in message


def test_unwritable_output_path_gives_one_line(tmp_path, capsys):
    """Catches: a bad --out found only after a minute of export, or as a traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = run_error(capsys, ["--random_init", "--out", str(blocker / "m.onnx"), "--", *EXPORT_TINY])
    assert "cannot create its folder" in message
    assert "is a folder" in run_error(capsys, ["--random_init", "--out", str(tmp_path), "--", *EXPORT_TINY])


def test_verify_pairs_reordered_queries_but_not_different_ones():
    """Catches: a comparison that fails a correct export whose near-tied proposals swapped two queries, or one
    that pairs queries so loosely that a wrong value passes."""
    from models.export_check import matched_differences
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(6, 3, generator=g), torch.rand(6, 4, generator=g)
    order = torch.tensor([0, 2, 1, 3, 4, 5])
    assert matched_differences(logits, boxes, logits[order], boxes[order]) == (0.0, 0.0, 2)
    assert matched_differences(logits, boxes, logits + 1e-6, boxes)[2] == 0
    wrong = logits.clone()
    wrong[4, 1] += 0.5
    logits_diff, boxes_diff, _ = matched_differences(logits, boxes, wrong, boxes)
    assert abs(logits_diff - 0.5) < 1e-6 and boxes_diff == 0.0



class StandInModel(torch.nn.Module):
    """A detector's raw outputs from a few operations (a real model's export takes a minute), in the keys
    verify_onnx reads: ``pred_logits`` [B, 4, 3], ``pred_boxes`` [B, 4, 4] in (0, 1), and as Sparse DETR's
    ``sparse_token_nums`` [B] (a function of the image), one kept token and its score."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Linear(3, 12)  # no transformer: not two-stage, every image is compared
        self.boxes = torch.nn.Linear(3, 16)

    def forward(self, samples):
        images = samples.tensors
        pooled = images.mean((2, 3))
        batch = images.shape[0]
        return {"pred_logits": self.logits(pooled).view(-1, 4, 3),
                "pred_boxes": self.boxes(pooled).sigmoid().view(-1, 4, 4),
                "sparse_token_nums": (images[:, 0] > 0).sum((1, 2)).int(),
                "backbone_topk_proposals": torch.zeros(batch, 1, dtype=torch.int64),
                "backbone_mask_prediction": torch.zeros(batch, 1)}


class StandIn(torch.nn.Module):
    """The graph of :class:`StandInModel`, as OnnxDetector builds one: images -> the outputs verify_onnx compares."""

    def __init__(self):
        super().__init__()
        self.model = StandInModel()

    def select_outputs(self, out):
        return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"],
                "kept_counts": out["sparse_token_nums"], "kept_tokens": out["backbone_topk_proposals"]}

    def forward(self, images):
        from util.misc import NestedTensor
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        return self.select_outputs(self.model(NestedTensor(images, mask)))


class Disagreeing:
    """``detector`` with one output changed after its model's forward: what verify_onnx compares the graph with."""

    def __init__(self, detector, key, change):
        self.detector, self.model, self.key, self.change = detector, detector.model, key, change

    def select_outputs(self, out):
        out = dict(self.detector.select_outputs(out))
        out[self.key] = self.change(out[self.key])
        return out


def test_verify_refuses_a_graph_that_disagrees(tmp_path):
    """Catches a verify_onnx that ignores the boxes, the logits or the kept counts (the export tests check its
    verdict, not the numbers themselves): a saved graph, verified against its own module with the boxes shifted
    by 1e-2, then the logits, then the kept counts plus one, is not ok each time; against the module as it is,
    ok."""
    from models.export_check import verify_onnx
    torch.manual_seed(0)
    stand_in = StandIn().eval()
    path = tmp_path / "stand_in.onnx"
    with torch.no_grad():
        torch.onnx.export(stand_in, (torch.randn(1, 3, *EXPORT_SIZE),), dynamo=True, input_names=["images"],
                          output_names=["pred_logits", "pred_boxes", "kept_counts", "kept_tokens"]).save(str(path))
    sizes = [EXPORT_SIZE]
    (record,) = verify_onnx(path, stand_in, sizes, tolerance=1e-4, threads=1)
    assert record["ok"] and record["kept_counts"] == record["onnx_kept_counts"], record
    for key, change in (("pred_boxes", lambda t: t + 1e-2), ("pred_logits", lambda t: t + 1e-2),
                        ("kept_counts", lambda t: t + 1)):
        (record,) = verify_onnx(path, Disagreeing(stand_in, key, change), sizes, tolerance=1e-4, threads=1)
        assert not record["ok"], (key, record)


def tiny_sparse_detector(seed=0):
    from models.export import OnnxDetector
    from inference import Detector
    detector = Detector.from_flags(EXPORT_TINY + EXPORT_VARIANTS["sparse_detr"], seed=seed)
    return OnnxDetector(model=detector.model, postprocessor=detector.postprocessor).eval()


def test_verify_passes_ties_at_the_top_rho_boundary_and_fails_a_changed_decoder(tmp_path):
    """Catches: --verify failing an honest Sparse DETR export whose runtimes break a score tie at the top-rho
    boundary differently (the issue's tiny model at 960x960), and a fix that hides real errors after the token
    selection. The scoring network's last layer is zeroed, so every token scores alike: PyTorch and onnxruntime
    keep different tokens, and the outputs differ by about 1 until PyTorch reruns with onnxruntime's kept tokens.
    Then the decoder's class head gets 1e-3 added in PyTorch only: the check must fail by exactly that."""
    from models.export import export_onnx
    from models.export_check import verify_onnx
    detector = tiny_sparse_detector()
    with torch.no_grad():
        detector.model.transformer.enc_mask_predictor.layer2[-1].weight.zero_()
    out = tmp_path / "ties.onnx"
    export_onnx(detector, out, example_size=EXPORT_SIZE)
    record, = verify_onnx(out, detector, VERIFY_SIZES[:1], tolerance=1e-4)
    assert record["ok"], record
    assert record["swapped_tokens"][0] > 0 and record["tie_gap"] == 0.0
    assert record["unmatched_logits_diff"] > 1e-2  # what the check compared before: a failure
    assert record["logits_diff"] <= 1e-4 and record["boxes_diff"] <= 1e-4
    head = detector.model.class_embed[detector.model.transformer.decoder.num_layers - 1]
    hook = head.register_forward_hook(lambda module, inputs, output: output + 1e-3)
    try:
        record, = verify_onnx(out, detector, VERIFY_SIZES[:1], tolerance=1e-4)
    finally:
        hook.remove()
    assert not record["ok"] and abs(record["logits_diff"] - 1e-3) < 2e-5, record


def test_verify_fails_a_wrong_op_in_the_exported_scoring_network(tmp_path):
    """Catches: a tie-tolerant check that compares the outputs with the other runtime's kept tokens and so never
    sees an error in the scoring network itself. The graph is exported with the scores negated (a Neg the eager
    model lacks): the kept counts agree, the tokens kept differ far from the boundary, and the check fails."""
    from models.export import export_onnx
    from models.export_check import verify_onnx
    detector = tiny_sparse_detector()
    scorer = detector.model.transformer.enc_mask_predictor
    hook = scorer.register_forward_hook(lambda module, inputs, output: {**output, "scores": -output["scores"]})
    try:
        export_onnx(detector, tmp_path / "wrong.onnx", example_size=EXPORT_SIZE)
    finally:
        hook.remove()
    record, = verify_onnx(tmp_path / "wrong.onnx", detector, VERIFY_SIZES[:1], tolerance=1e-4)
    assert record["kept_counts"] == record["onnx_kept_counts"]
    assert not record["ok"] and record["tie_gap"] > 1e-3 and record["swapped_tokens"][0] > 0, record


def test_kept_token_differences_by_hand():
    """Catches: swaps counted twice, a boundary taken from the other runtime's tokens or from the wrong image,
    tokens past an image's own count compared."""
    from models.export_check import kept_token_differences
    scores = torch.tensor([[0.9, 0.5, 0.5 + 3e-8, 0.1, 0.2], [0.1, 0.8, 0.7, 0.3, 0.6]])
    kept = torch.tensor([[0, 1, 4], [1, 2, 4]])
    other = torch.tensor([[0, 2, 3], [1, 4, 0]])  # image 0: 1 swapped for 2; image 1 keeps 2 of 3: its count is 2
    swapped, gap = kept_token_differences(scores, kept, other, [2, 2])
    assert swapped == [1, 1]
    # image 0: |0.5 + 3e-8 - 0.5|; image 1 (boundary 0.7, its 2nd best): tokens 2 and 4, |0.6 - 0.7| = 0.1
    assert gap == pytest.approx(0.1, abs=1e-6)
    assert kept_token_differences(scores, kept, kept, [3, 3]) == ([0, 0], 0.0)


def test_default_sizes_are_the_models_own():
    """Catches: verifying (and exporting) at 800/1333 sizes whatever the model was trained at; a size rule that
    rounds where the pipeline truncates (1067 instead of 1066); a square-only model checked only at its export
    size (a frozen H, W would pass)."""
    from argparse import Namespace
    from tools.export_onnx import own_sizes, verify_sizes
    assert own_sizes(800, 1333) == [(800, 1066), (1066, 800), (750, 1333)]
    assert own_sizes(96, 128) == [(96, 128), (128, 96), (72, 128)]
    assert own_sizes(64, 64) == [(64, 64)]
    assert verify_sizes(Namespace(verify_sizes=None), [(64, 64)], (64, 64), 64) == [(64, 64), (80, 96)]
    assert verify_sizes(Namespace(verify_sizes=[70, 90]), [(64, 64)], (64, 64), 64) == [(70, 90)]


def test_metadata_round_trips_through_onnxruntime(sparse_export):
    """Catches: metadata not written, written for the default model (800/1333, no names) instead of this one, or
    unreadable without torch (tools/onnx_predict.py reads it with onnxruntime alone)."""
    import onnxruntime
    from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
    from tools.onnx_predict import read_metadata
    out = sparse_export[0]
    metadata = read_metadata(onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]))
    assert metadata["class_names"] == SPARSE_NAMES and metadata["num_classes"] == 5
    assert (metadata["val_size"], metadata["max_size"]) == (96, 128)
    assert metadata["mean"] == list(IMAGENET_MEAN) and metadata["std"] == list(IMAGENET_STD)
    assert metadata["rho"] == 0.3 and metadata["opset"] == 17 and metadata["inputs"] == ["images", "pixel_mask"]
    description = metadata["description"]
    assert description["rho"] == 0.3 and description["hidden_dim"] == 32 and description["val_size"] == 96
    assert description["two_stage"] is True and description["num_queries"] == 8


@pytest.mark.parametrize("width,height", [(103, 75), (75, 103), (300, 90), (2000, 21)])
def test_onnx_predict_resize_is_the_pipelines(width, height):
    """Catches: round() where the pipeline truncates (103x75 at 96: 131.84 -> 131 px, round gives 132), the
    max_size cap or the extreme-ratio clamp computed differently (300x90: capped by 128; 2000x21: clamped)."""
    from datasets.transforms import get_resize_hw
    from tools.onnx_predict import resize_hw
    for val_size, max_size in [(96, 128), (96, 160), (800, 1333), (64, 64)]:
        assert resize_hw(width, height, val_size, max_size) == get_resize_hw((width, height), val_size, max_size)
    assert resize_hw(103, 75, 96, 160) == (96, 131)


def test_onnx_predict_matches_the_pytorch_api(sparse_export):
    """Catches: preprocessing that differs from the pipeline's (resize filter, rounding, normalisation), boxes
    scaled by the resized instead of the original size, names not read from the metadata. The same random model
    (seed 0) in PyTorch (inference.py) and in onnxruntime (tools/onnx_predict.py) on a 103x75 image."""
    from inference import Detector
    from tools.onnx_predict import OnnxDetector, preprocess
    out = sparse_export[0]
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 103, 3), dtype=np.uint8))
    pytorch = Detector.from_flags(EXPORT_TINY + EXPORT_VARIANTS["sparse_detr"] + list(SPARSE_SIZE_RULE),
                                  categories={"categories": [{"id": k, "name": v} for k, v in SPARSE_NAMES.items()]})
    onnx = OnnxDetector(out, threads=1)
    samples, _ = pytorch.preprocess([image])
    assert samples.tensors.shape[-2:] == (93, 127)  # capped by max_size 128: int(93 * 103 / 75) = int(127.7)
    np.testing.assert_array_equal(preprocess(image, onnx.metadata), samples.tensors.numpy())
    expected, = pytorch([image])
    got, = onnx.predict([image])
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["boxes"], expected["boxes"].numpy(), atol=1e-3)
    assert got["names"] == expected["names"] and set(got["names"]) <= {*SPARSE_NAMES.values(), "0", "2"}
    assert got["boxes"][:, 2].max() > 103 * 0.5  # pixels of the 103x75 original, not normalised
