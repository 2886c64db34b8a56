"""tools/export_onnx.py and models/export.py: every variant exports to ONNX and onnxruntime matches PyTorch at
sizes other than the export size; bad input gives one-line errors."""
import pytest
import torch

from main import parse_args
from models import build_model
from tiny_flags import EXPORT_TINY, EXPORT_VARIANTS

EXPORT_SIZE = (96, 128)
VERIFY_SIZES = [(80, 160), (160, 96), (112, 136)]  # 20, 23 and 25 kept tokens in Sparse DETR; 19 at 96x128


def export(tmp_path, variant, *extra):
    from tools.export_onnx import main as export_onnx
    out = tmp_path / f"{variant}.onnx"
    records = export_onnx(["--random_init", "--out", str(out), "--export_size", *map(str, EXPORT_SIZE), "--verify",
                           "--threads", "1", "--verify_sizes", *[str(v) for size in VERIFY_SIZES for v in size],
                           *extra, "--", *EXPORT_TINY, *EXPORT_VARIANTS[variant]])
    return out, records


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


@pytest.mark.parametrize("variant", ["sparse_detr", "sparse_detr_objectness"])
def test_sparse_detr_kept_count_is_computed_in_the_graph(tmp_path, variant):
    """Catches: Sparse DETR's kept-token count frozen at the export size (as int() in a trace does), for each
    token-selection rule. Exported with a pixel mask and verified on padded batches of two: the count differs
    between sizes and between the two images of one batch (the padded one has fewer valid tokens), and equals
    PyTorch's everywhere."""
    _, records = export(tmp_path, variant, "--with_mask", "--verify_batch", "2")
    assert all(r["ok"] for r in records), records
    assert all("padded_logits_diff" in r for r in records)  # two-stage: padded images reported apart
    counts = [r["onnx_kept_counts"] for r in records]
    assert counts == [r["kept_counts"] for r in records]
    assert len({c[0] for c in counts}) == len(VERIFY_SIZES)  # one count per size
    assert all(c[1] < c[0] for c in counts)  # the padded image keeps fewer
    # The example's own count (a batch of 96x128 images) is none of them: not a constant of the graph.
    args = parse_args(EXPORT_TINY + EXPORT_VARIANTS[variant])
    model, _, _ = build_model(args, load_backbone_weights=False)
    with torch.no_grad():
        example = model(torch.randn(1, 3, *EXPORT_SIZE).unbind(0))["sparse_token_nums"].item()
    assert example not in {c[0] for c in counts}


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
    from models.export import matched_differences
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(6, 3, generator=g), torch.rand(6, 4, generator=g)
    order = torch.tensor([0, 2, 1, 3, 4, 5])
    assert matched_differences(logits, boxes, logits[order], boxes[order]) == (0.0, 0.0, 2)
    assert matched_differences(logits, boxes, logits + 1e-6, boxes)[2] == 0
    wrong = logits.clone()
    wrong[4, 1] += 0.5
    logits_diff, boxes_diff, _ = matched_differences(logits, boxes, wrong, boxes)
    assert abs(logits_diff - 0.5) < 1e-6 and boxes_diff == 0.0
