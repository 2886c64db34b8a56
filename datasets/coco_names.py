"""The names of COCO's detection categories, by category id, and the names a model's boxes are labelled with."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Union

from util.errors import InputError

# The 80 COCO detection categories by their ids (1-90, ten ids unused).
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def category_names(num_classes: int, categories: Union[None, str, Path, Mapping[str, Any]] = None) -> dict[int, str]:
    """Names by category id: from ``categories`` (a COCO-format annotation file or its loaded dict), else COCO's
    for 91-class models, else none (ids are shown)."""
    if isinstance(categories, (str, Path)):
        if not Path(categories).is_file():
            raise InputError(f"categories file not found: {categories}")
        categories = json.loads(Path(categories).read_text())
    if categories is not None:
        return {int(c["id"]): str(c["name"]) for c in categories.get("categories", [])}
    return dict(COCO_CATEGORY_NAMES) if num_classes == 91 else {}
