"""Detect objects with an exported ONNX file, needing only numpy, Pillow and onnxruntime (no torch, nothing of
this repository): copy this file next to the .onnx file and run it anywhere.

    python tools/onnx_predict.py sparse_detr.onnx dog.jpg cat.png --threshold 0.5

or from Python:

    from onnx_predict import OnnxDetector
    detector = OnnxDetector("sparse_detr.onnx")
    for det in detector.predict(["dog.jpg"], threshold=0.5):
        print(det["names"], det["scores"], det["boxes"])  # boxes [N, 4] x0, y0, x1, y1 in the image's pixels

Everything the preprocessing needs is read from the file's metadata (written by tools/export_onnx.py, see
models/export.py ``onnx_metadata``): the size rule (shorter side ``val_size``, longer at most ``max_size``,
sides truncated by ``int()`` exactly as datasets/transforms.py ``get_resize_hw``), the mean and std, and the
class names. An image is resized with Pillow's bilinear filter (as torchvision does for PIL images), scaled to
[0, 1], normalised, and run alone (no padding), so the scores equal those of the PyTorch API
(inference.py) to float32 rounding.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import onnxruntime
from PIL import Image

MIN_SIDE = 64  # datasets/transforms.py MIN_SIDE: the deepest feature map's stride
SUPPORTED_METADATA = 1


def read_metadata(session: onnxruntime.InferenceSession) -> dict[str, Any]:
    """The exported file's metadata as Python values: ``class_names`` {id: name}, ``num_classes``, ``val_size``,
    ``max_size``, ``mean``, ``std`` (lists of 3), ``description`` (the model's main.py arguments), ``rho``,
    ``opset``, ``inputs``. Raises ValueError for a file without it (exported before it was written)."""
    props = session.get_modelmeta().custom_metadata_map
    if "metadata_version" not in props:
        raise ValueError("the ONNX file has no metadata of tools/export_onnx.py: export it again with this repo")
    if int(props["metadata_version"]) > SUPPORTED_METADATA:
        raise ValueError(f"metadata version {props['metadata_version']} is newer than this script reads "
                         f"({SUPPORTED_METADATA}): use the onnx_predict.py of the repo that exported it")
    return {
        "class_names": {int(k): v for k, v in json.loads(props["class_names"]).items()},
        "num_classes": int(props["num_classes"]), "val_size": int(props["val_size"]),
        "max_size": int(props["max_size"]), "mean": json.loads(props["mean"]), "std": json.loads(props["std"]),
        "description": json.loads(props["description"]), "rho": float(props["rho"]), "opset": int(props["opset"]),
        "inputs": props["inputs"].split(","),
    }


def resize_hw(width: int, height: int, val_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a ``width`` x ``height`` image after the model's resize, as datasets/transforms.py
    ``get_resize_hw``: shorter side ``val_size`` (``round(max_size * short / long)`` when the longer would pass
    ``max_size``), longer ``int(size * long / short)``; for extreme aspect ratios the shorter side is kept at
    ``min(val_size, 64, max_size)`` px and the longer cut to ``max_size``."""
    size = val_size
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        out_h, out_w = height, width
    elif width < height:
        out_h, out_w = int(size * height / width), size
    else:
        out_h, out_w = size, int(size * width / height)
    out_short, out_long = (out_w, out_h) if width < height else (out_h, out_w)
    min_short = min(val_size, MIN_SIDE, max_size)
    if out_short < min_short:
        out_short = min_short
        out_long = max(out_short, min(int(out_short * long / short), max_size))
        return (out_long, out_short) if width < height else (out_short, out_long)
    return out_h, out_w


def preprocess(image: Image.Image, metadata: Mapping[str, Any]) -> np.ndarray:
    """An RGB PIL image -> ``images`` [1, 3, H, W] float32: resized by the size rule, RGB / 255, minus the mean,
    over the std (float32 throughout, as torchvision's ToTensor and Normalize)."""
    h, w = resize_hw(image.width, image.height, metadata["val_size"], metadata["max_size"])
    resized = image.convert("RGB").resize((w, h), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(metadata["mean"], np.float32)) / np.asarray(metadata["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


class OnnxDetector:
    """An exported detector in onnxruntime with the preprocessing its metadata describes."""

    def __init__(self, path: Union[str, Path], *, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)):
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=list(providers))
        self.metadata = read_metadata(self.session)

    def predict(self, images: Sequence[Union[str, Path, Image.Image]], threshold: float = 0.0) -> list[dict]:
        """One dict per image, best first: ``boxes`` [N, 4] float32 (x0, y0, x1, y1 in the image's pixels),
        ``scores`` [N], ``labels`` [N] int64 class ids, ``names`` N strings (the id where no name is known)."""
        results = []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.open(image)
            image = image.convert("RGB")
            feed = {"images": preprocess(image, self.metadata)}
            if "pixel_mask" in self.metadata["inputs"]:  # exported --with_mask: one image, nothing padded
                feed["pixel_mask"] = np.zeros((1, *feed["images"].shape[2:]), dtype=bool)
            scores, labels, boxes = self.session.run(["scores", "labels", "boxes"], feed)
            order = np.argsort(-scores[0], kind="stable")
            keep = order[scores[0][order] >= threshold]
            scale = np.array([image.width, image.height, image.width, image.height], np.float32)
            results.append({"boxes": boxes[0][keep] * scale, "scores": scores[0][keep], "labels": labels[0][keep],
                            "names": [self.metadata["class_names"].get(int(label), str(int(label)))
                                      for label in labels[0][keep]]})
        return results


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", help="file written by tools/export_onnx.py")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--threshold", type=float, default=0.5, help="smallest score printed")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime CPU threads (0: all)")
    args = parser.parse_args(argv)
    for path in [args.onnx, *args.images]:
        if not Path(path).is_file():
            raise SystemExit(f"error: file not found: {path}")
    try:
        detector = OnnxDetector(args.onnx, threads=args.threads)
    except ValueError as err:
        raise SystemExit(f"error: {args.onnx}: {err}") from None
    for path in args.images:
        try:
            det = detector.predict([path], args.threshold)[0]
        except OSError as err:  # PIL's UnidentifiedImageError included
            raise SystemExit(f"error: cannot read image {path} ({err}): give an image file Pillow can decode") from None
        print(f"{path}: {len(det['scores'])} detections scoring at least {args.threshold:g}")
        for name, score, box in zip(det["names"], det["scores"], det["boxes"]):
            print(f"  {name} {score:.3f} [{', '.join(f'{v:.1f}' for v in box)}]")


if __name__ == "__main__":
    main(sys.argv[1:])
