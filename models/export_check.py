"""The check of an exported ONNX file in onnxruntime against PyTorch (``tools/export_onnx.py --verify``).

Two runtimes never agree to the last bit, so a check must not fail on what rounding alone explains:

* **Swapped queries.** In two-stage models the queries are the proposals in score order; two proposals whose
  scores differ by rounding can swap places. Each query is compared with its counterpart, found by a
  minimum-cost assignment (:func:`matched_differences`).
* **Ties at Sparse DETR's top-ρ boundary.** The encoder updates the ``k`` best-scoring tokens. When the k-th
  and the (k+1)-th token score alike to 1e-8 (seen at 700x1243 with a tiny trained model: 0.09841414 and
  0.09841411), rounding decides which one is kept, and the two runtimes keep different tokens; everything
  downstream then differs (logits by 3e-3 to 1e-1) although both graphs compute the same function. So the
  kept token sets are compared first: every token kept by one runtime only must score (in PyTorch) within
  twice the tolerance of the boundary (if each runtime's scores are within the tolerance of the true ones,
  a swap can only happen between tokens that close), else the scoring network itself differs. Then PyTorch
  is run again with onnxruntime's kept tokens (:func:`kept_tokens_from`) and the outputs are held to the
  tolerance.

A real error (a wrong operator in the graph) therefore still fails: after the token selection it shows in
the outputs with the same tokens kept; in the scoring network it shows as swapped tokens far from the
boundary.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from util.misc import NestedTensor

from .export import OnnxDetector, two_stage


@contextlib.contextmanager
def kept_tokens_from(model: nn.Module, kept_index: Tensor) -> Iterator[None]:
    """While active, Sparse DETR ``model``'s encoder updates the tokens ``kept_index`` [B, K] (flat token
    indices, best first, K the batch's largest kept count) instead of its own top-ρ choice; the scores and
    kept counts are still its own. For comparing two runtimes with the same tokens kept."""
    transformer = model.transformer
    select = transformer.select_sparse_tokens

    def select_given(*inputs) -> dict:
        out = select(*inputs)
        own = out["backbone_topk_proposals"]
        if own.shape != kept_index.shape:
            raise ValueError(f"kept_index {list(kept_index.shape)} does not match the model's kept tokens "
                             f"{list(own.shape)}")
        return {**out, "backbone_topk_proposals": kept_index.to(own.device, own.dtype)}

    transformer.select_sparse_tokens = select_given  # an instance attribute, over the class's method
    try:
        yield
    finally:
        del transformer.select_sparse_tokens


def kept_token_differences(scores: Tensor, kept: Tensor, other_kept: Tensor, counts: Sequence[int]
                           ) -> tuple[list[int], float]:
    """How two runtimes' kept tokens differ: (per image, the tokens kept by one runtime only, counted on each
    side; the largest distance of such a token's score from the boundary, 0.0 when none differ).

    ``scores`` [B, S]: PyTorch's token scores; ``kept`` / ``other_kept`` [B, K]: the kept token indices of
    PyTorch and of the other runtime, best first; ``counts``: each image's kept count (equal in both). The
    boundary of an image is the score of PyTorch's last kept token (its ``counts[b]``-th best)."""
    swapped, gap = [], 0.0
    for image, count in enumerate(counts):
        own = kept[image, :count]
        differ = set(own.tolist()) ^ set(other_kept[image, :count].tolist())
        swapped.append(len(differ) // 2)
        if differ:
            boundary = scores[image, own[-1]]
            index = torch.tensor(sorted(differ), device=scores.device)
            gap = max(gap, float((scores[image, index] - boundary).abs().max()))
    return swapped, gap


def matched_differences(logits: Tensor, boxes: Tensor, other_logits: Tensor, other_boxes: Tensor
                        ) -> tuple[float, float, int]:
    """(max abs logits difference, max abs boxes difference, queries that changed place) of one image's two
    sets of predictions [Q, K] and [Q, 4], each query compared with its counterpart in the other set.

    The predictions are a set: in two-stage models the queries are the proposals in score order, and two
    proposals whose scores differ by rounding (1e-6 among 17,000 tokens) can swap places between PyTorch and
    onnxruntime. Counterparts are therefore paired by a minimum-cost assignment of the max abs difference;
    without such swaps the pairing is the identity."""
    from scipy.optimize import linear_sum_assignment
    cost = torch.maximum(torch.cdist(logits.double(), other_logits.double(), p=float("inf")),
                         torch.cdist(boxes.double(), other_boxes.double(), p=float("inf")))
    rows, cols = linear_sum_assignment(cost.numpy())
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return (float((logits[rows] - other_logits[cols]).abs().max()), float((boxes[rows] - other_boxes[cols]).abs().max()),
            int((rows != cols).sum()))


def verify_onnx(path: str | Path, detector: OnnxDetector, sizes: Sequence[tuple[int, int]], *,
                tolerance: float, batch: int = 1, with_mask: bool = False, threads: int = 0,
                seed: int = 1) -> list[dict]:
    """Run the ONNX file in onnxruntime (CPU) and ``detector`` in PyTorch on random normalised images of each
    (H, W) in ``sizes`` (``batch`` images each; with ``with_mask`` the images after the first are padded: their
    bottom and right quarter are masked). Returns one record per size:

    * ``size``; ``logits_diff``, ``boxes_diff``: max abs differences of each query and its counterpart (see
      :func:`matched_differences`); ``reordered_queries``;
    * Sparse DETR: ``kept_counts``, ``onnx_kept_counts``; ``swapped_tokens`` (per image, tokens kept by one
      runtime only) and ``tie_gap`` (their largest score distance from the boundary, see the module
      docstring). Where tokens were swapped the diffs are those of PyTorch run with onnxruntime's kept tokens,
      and ``unmatched_logits_diff`` is the logits difference before that;
    * ``ok``: diffs within ``tolerance``, equal kept counts, and swaps only between tokens within
      ``2 * tolerance`` of the boundary.

    Two-stage models rank every token's proposal, padding included, as the reference does; all padding
    tokens score alike, and where that score reaches the top (random weights) the tie is broken differently
    by PyTorch and onnxruntime. Their padded images are therefore left out of the diffs (reported as
    ``padded_logits_diff``); the kept counts of every image are still compared."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    records = []
    for h, w in sizes:
        images = torch.randn(batch, 3, h, w, generator=generator)
        mask = torch.zeros(batch, h, w, dtype=torch.bool)
        if with_mask and batch > 1:
            mask[1:, 3 * h // 4:] = True
            mask[1:, :, 3 * w // 4:] = True
            images = images.masked_fill(mask[:, None], 0.0)
        feed = {"images": images.numpy()}
        if "pixel_mask" in inputs:
            feed["pixel_mask"] = mask.numpy()
        samples = NestedTensor(images, mask)
        with torch.no_grad():
            raw = detector.model(samples)
        expected = detector.select_outputs(raw)
        got = {name: torch.from_numpy(value) for name, value in zip(names, session.run(None, feed))}
        record: dict = {"size": (h, w)}
        ok = True
        if "kept_counts" in expected:
            record["kept_counts"] = expected["kept_counts"].tolist()
            record["onnx_kept_counts"] = got["kept_counts"].tolist()
            if record["kept_counts"] == record["onnx_kept_counts"]:
                swapped, gap = kept_token_differences(raw["backbone_mask_prediction"], expected["kept_tokens"],
                                                      got["kept_tokens"], record["kept_counts"])
                record.update(swapped_tokens=swapped, tie_gap=gap)
                ok = gap <= 2 * tolerance
                if any(swapped):
                    record["unmatched_logits_diff"] = max(
                        matched_differences(expected["pred_logits"][i], expected["pred_boxes"][i],
                                            got["pred_logits"][i], got["pred_boxes"][i])[0] for i in range(batch))
                    with torch.no_grad(), kept_tokens_from(detector.model, got["kept_tokens"]):
                        expected = detector.select_outputs(detector.model(samples))
            else:
                ok = False
        diffs = [matched_differences(expected["pred_logits"][i], expected["pred_boxes"][i], got["pred_logits"][i],
                                     got["pred_boxes"][i]) for i in range(batch)]
        strict = ~mask.flatten(1).any(1) if two_stage(detector.model) else torch.ones(batch, dtype=torch.bool)
        held = [d for d, keep in zip(diffs, strict.tolist()) if keep]
        record.update(logits_diff=max(d[0] for d in held), boxes_diff=max(d[1] for d in held),
                      reordered_queries=sum(d[2] for d in held))
        if not strict.all():
            record["padded_logits_diff"] = max(d[0] for d, keep in zip(diffs, strict.tolist()) if not keep)
        record["ok"] = ok and record["logits_diff"] <= tolerance and record["boxes_diff"] <= tolerance
        records.append(record)
    return records


def describe(record: dict) -> str:
    """One line of a :func:`verify_onnx` record, as ``tools/export_onnx.py --verify`` prints it."""
    h, w = record["size"]
    notes = []
    if "kept_counts" in record:
        notes.append(f"kept tokens {record['kept_counts']} (onnx {record['onnx_kept_counts']})")
        swapped = sum(record.get("swapped_tokens", []))
        if swapped:
            notes.append(f"{swapped} kept token(s) swapped for another at the top-rho boundary (scores within "
                         f"{record['tie_gap']:.1e} of it; logits differed by {record['unmatched_logits_diff']:.2e}), "
                         "compared with onnxruntime's kept tokens")
    if record["reordered_queries"]:
        notes.append(f"{record['reordered_queries']} queries in another order (near-equal proposal scores)")
    if "padded_logits_diff" in record:
        notes.append(f"padded images not held to the tolerance: logits {record['padded_logits_diff']:.2e}")
    return (f"verify {h}x{w}: max |logits diff| {record['logits_diff']:.2e}, max |boxes diff| "
            f"{record['boxes_diff']:.2e}{''.join(', ' + n for n in notes)}: {'ok' if record['ok'] else 'FAILED'}")
