"""Checks of a COCO annotation file, shared by the dataset (:mod:`datasets.coco`) and ``tools/check_dataset.py``.

Two kinds of problem:

* the file is not COCO (not JSON, lists or fields missing, repeated ids, annotations of unlisted images):
  :func:`read_annotation_file` raises :class:`~util.errors.InputError` naming the problem and the format;
* fixable problems, each kind one :class:`Finding` (:func:`clean_annotations`): images missing on disk and
  boxes that are not 4 finite numbers are dropped, missing "area"/"iscrowd" (and areas of 0) filled in,
  repeated categories dropped, annotation ids from 0 renumbered for COCO evaluation, odd boxes, crowd-only
  images, repeated image files and file names in another Unicode normalisation reported (training clips boxes or leaves them out,
  as the reference does). :func:`report_findings` logs each kind
  once with a count; ``strict_data`` turns the dropping ones into errors.

Plus the category ids: never negative, and below ``num_classes`` (:func:`negative_category_problem`,
:func:`num_classes_problem`, :func:`check_category_ids`).
"""
from __future__ import annotations

import json
import logging
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from util.errors import InputError

from .images import DiskNames

logger = logging.getLogger(__name__)

COCO_NUM_CLASSES = 91  # standard COCO ids go up to 90; index 0 unused
COCO_FORMAT_HELP = (
    'A COCO annotation file is a JSON object with the lists "images" (each {"id": int, "file_name": str, '
    '"width": int, "height": int}), "annotations" (each {"id": int, "image_id": int, "category_id": int, '
    '"bbox": [x, y, width, height], "area": number, "iscrowd": 0 or 1}) and "categories" (each {"id": int, '
    '"name": str}).'
)
MAX_EXAMPLES = 3  # examples named per kind of problem


# ----------------------------------------------------------------------------------------------
# Is it a COCO file? Problems here make the file unusable: InputError.


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: Any) -> bool:
    return _is_finite_number(value) and value > 0


def _is_file_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


# Per list of the file: the fields each record needs, with their check and what the check wants.
REQUIRED_FIELDS: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    "images": (("id", _is_int, "an integer"), ("file_name", _is_file_name, "a non-empty string"),
               ("width", _is_positive_number, "a positive number"),
               ("height", _is_positive_number, "a positive number")),
    "annotations": (("id", _is_int, "an integer"), ("image_id", _is_int, "an integer"),
                    ("category_id", _is_int, "an integer")),
    "categories": (("id", _is_int, "an integer"),),
}


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with its article: 'an array', 'a string', ..."""
    if value is None:
        return "null"
    names = {bool: "a boolean", dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), "a number")


def _short_json(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def not_coco_error(ann_file: str | Path, problem: str) -> InputError:
    """The InputError for an annotation file that cannot be used: the file, the problem, the format."""
    return InputError(f"{ann_file} is not a usable COCO annotation file: {problem}. {COCO_FORMAT_HELP}")


def read_annotation_file(ann_file: str | Path, *, images_only: bool = False) -> dict:
    """The parsed JSON of ``ann_file``, checked by :func:`check_coco_structure`; InputError if not COCO.
    ``images_only``: an image-info file (COCO test-dev's ``image_info_test-dev2017.json``) may lack
    "annotations" (then an empty list)."""
    try:
        with open(ann_file, "rb") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as err:
        raise not_coco_error(ann_file, f"it is not valid JSON ({err.msg} at line {err.lineno}, "
                                       f"column {err.colno})") from None
    except UnicodeDecodeError:
        raise not_coco_error(ann_file, "it is not valid JSON (not UTF-8 text)") from None
    if images_only and isinstance(dataset, dict):
        dataset.setdefault("annotations", [])
    check_coco_structure(dataset, ann_file)
    return dataset


def check_coco_structure(dataset: Any, ann_file: str | Path) -> None:
    """Raise InputError unless ``dataset`` is a dict whose "images", "annotations" and "categories" are lists
    of records with the :data:`REQUIRED_FIELDS`, image and annotation ids are unique, and every annotation's
    image is listed. Checked before pycocotools indexes the file: it would assert or raise KeyError."""
    if not isinstance(dataset, dict):
        raise not_coco_error(ann_file, f"the file holds {_json_type(dataset)}, not a JSON object")
    for key in REQUIRED_FIELDS:
        _check_records(dataset, key, ann_file)
    _check_unique_ids(dataset["images"], "images", ann_file)
    _check_unique_ids(dataset["annotations"], "annotations", ann_file)
    _check_image_references(dataset, ann_file)


def _check_records(dataset: dict, key: str, ann_file: str | Path) -> None:
    records = dataset.get(key)
    if records is None:
        raise not_coco_error(ann_file, f'it has no "{key}" list')
    if not isinstance(records, list):
        raise not_coco_error(ann_file, f'"{key}" is {_json_type(records)}, not a list')
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise not_coco_error(ann_file, f'"{key}"[{index}] is {_json_type(record)}, not an object')
        for name, is_valid, wanted in REQUIRED_FIELDS[key]:
            if not is_valid(record.get(name)):
                found = f"found {_short_json(record[name])}" if name in record else "but it is missing"
                raise not_coco_error(ann_file, f'"{key}"[{index}]["{name}"] must be {wanted}, {found}')


def _check_unique_ids(records: list[dict], key: str, ann_file: str | Path) -> None:
    repeated = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
    if repeated:
        examples = ", ".join(map(str, repeated[:MAX_EXAMPLES]))
        raise not_coco_error(ann_file, f'{len(repeated)} ids appear more than once in "{key}" (e.g. {examples}); '
                                       "each entry needs its own id (pycocotools indexes them by id)")


def _check_image_references(dataset: dict, ann_file: str | Path) -> None:
    image_ids = {image["id"] for image in dataset["images"]}
    orphans = [a for a in dataset["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        examples = ", ".join(f'annotation {a["id"]} -> image_id {a["image_id"]}' for a in orphans[:MAX_EXAMPLES])
        raise not_coco_error(ann_file, f'{len(orphans)} annotations refer to image ids missing from "images" '
                                       f"(e.g. {examples}); list those images or remove the annotations")


# ----------------------------------------------------------------------------------------------
# Fixable problems: each kind is one Finding, logged once (or an error with strict_data).


@dataclass(kw_only=True)
class Finding:
    """``count`` cases of one kind of data problem, the first few named in ``examples``.

    ``action`` says what training does about them; ``fix`` (only for the problems that ``strict_data``
    turns into errors) says what the user should change.
    """

    problem: str
    count: int
    examples: list[str]
    action: str
    fix: str = ""

    def __str__(self) -> str:
        """``"<problem>: <count> (e.g. <examples>); <action>"``."""
        return f"{self.problem}: {self.count} (e.g. {', '.join(self.examples)}); {self.action}"


def make_findings(problem: str, cases: Sequence[Any], example: Callable[[Any], str], action: str,
                  fix: str = "") -> list[Finding]:
    """``[Finding]`` for a non-empty list of cases, ``[]`` otherwise."""
    if not cases:
        return []
    return [Finding(problem=problem, count=len(cases), examples=[example(c) for c in cases[:MAX_EXAMPLES]],
                    action=action, fix=fix)]


def _annotation_name(ann: dict) -> str:
    return f'annotation {ann["id"]}'


def _is_box(bbox: Any) -> bool:
    """Whether ``bbox`` is a list of 4 finite numbers (the sum is not finite if one of them is not, or if they
    are absurdly large); written for speed: COCO train has 860k boxes."""
    return type(bbox) is list and len(bbox) == 4 and set(map(type, bbox)) <= {int, float} and math.isfinite(sum(bbox))


def drop_missing_images(dataset: dict, img_folder: Path) -> list[Finding]:
    """Remove the images whose file is not in ``img_folder``, and their annotations, from ``dataset``; a file
    found under another Unicode normalisation of its name (NFC in the JSON, NFD on disk or the reverse) is used,
    its "file_name" set to the name on disk. One directory listing: fast for 118k images."""
    disk = DiskNames(img_folder)
    missing, renamed = [], []
    for image in dataset["images"]:
        found = disk.find(image["file_name"])
        if found is None:
            missing.append(image)
        elif found != image["file_name"]:
            renamed.append(f'{image["file_name"]!r} ({_normal_form(image["file_name"])} in the JSON, '
                           f"{_normal_form(found)} on disk)")
            image["file_name"] = found
    missing_ids = {image["id"] for image in missing}
    dataset["images"] = [image for image in dataset["images"] if image["id"] not in missing_ids]
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] not in missing_ids]
    return [
        *make_findings(f"images missing from {img_folder}", missing, lambda image: image["file_name"],
                       "skipped with their annotations",
                       fix="restore the files or remove these images from the annotation file"),
        *make_findings("file names written under another Unicode normalisation on disk", renamed, str,
                       "the files on disk are used; rename them (or the JSON's \"file_name\") to the same form "
                       "for other tools"),
    ]


def _normal_form(name: str) -> str:
    """"NFC", "NFD", "NFC/NFD" (both) or "mixed": the Unicode normalisation ``name`` is written in."""
    return "/".join(form for form in ("NFC", "NFD") if unicodedata.is_normalized(form, name)) or "mixed"


def drop_malformed_boxes(dataset: dict) -> list[Finding]:
    """Remove the annotations whose "bbox" is not 4 finite numbers from ``dataset``: a NaN must never reach
    the loss, and pycocotools cannot evaluate such boxes."""
    kept, malformed = [], []
    for ann in dataset["annotations"]:
        (kept if _is_box(ann.get("bbox")) else malformed).append(ann)
    dataset["annotations"] = kept
    return make_findings('annotations whose "bbox" is not 4 finite numbers [x, y, width, height]', malformed,
                         lambda a: f'{_annotation_name(a)}: {_short_json(a.get("bbox"))}', "dropped",
                         fix="correct or remove these annotations")


def fill_missing_areas(dataset: dict) -> list[Finding]:
    """Set a missing or invalid "area" (not a number >= 0), or an area of 0 on a box that is not empty, to the
    bbox's width x height; COCO evaluation needs it to sort objects into small, medium and large (an area of 0
    makes every object small). Call after :func:`drop_malformed_boxes`."""
    bad = [a for a in dataset["annotations"] if not (_is_finite_number(a.get("area")) and a["area"] >= 0)]
    zero = [a for a in dataset["annotations"]
            if _is_finite_number(a.get("area")) and a["area"] == 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    for ann in bad + zero:
        ann["area"] = max(ann["bbox"][2], 0) * max(ann["bbox"][3], 0)
    return [
        *make_findings('annotations without a valid "area"', bad, _annotation_name,
                       "using the box's width x height (COCO evaluation uses it for small/medium/large)"),
        *make_findings('annotations with "area" 0 on a box that is not empty', zero,
                       lambda a: f'{_annotation_name(a)}: bbox {_short_json(a["bbox"])}',
                       "using the box's width x height (with 0, COCO evaluation would count every such object as "
                       "small: APs too high, APm and APl wrong)"),
    ]


def renumber_annotation_ids(dataset: dict) -> list[Finding]:
    """Number the annotations 1..N (in their order) when some "id" is 0 or negative: pycocotools' evaluation
    stores the id of the matched ground truth and takes 0 for "no match" (a negative id lets a box be matched
    twice), so a perfect detection of such an object would count as a false positive. Ids exist for the
    evaluation alone; the file is left as it is. Call last: the other findings name the file's ids."""
    bad = [_annotation_name(a) for a in dataset["annotations"] if a["id"] <= 0]
    if bad:
        for number, ann in enumerate(dataset["annotations"], 1):
            ann["id"] = number
    return make_findings('annotations whose "id" is 0 or negative', bad, str,
                         f'all {len(dataset["annotations"])} annotations renumbered 1..N for COCO evaluation, which '
                         "reads id 0 as \"no match\" (the file is unchanged; ids from 1 avoid this)")


def duplicate_image_findings(dataset: dict) -> list[Finding]:
    """Image files listed more than once under different ids: trained on once per listing, and each listing's
    objects evaluated (counted) separately."""
    ids_by_name: dict[str, list[int]] = {}
    for image in dataset["images"]:
        ids_by_name.setdefault(image["file_name"], []).append(image["id"])
    repeated = [(name, ids) for name, ids in ids_by_name.items() if len(ids) > 1]
    return make_findings('image files listed more than once under different ids (the same "file_name")', repeated,
                         lambda item: f'{item[0]} (ids {", ".join(map(str, item[1]))})',
                         "each listing is trained on and evaluated as an image of its own: its objects count twice; "
                         'remove the repeated entries from "images" (and move their annotations)')


def deduplicate_categories(dataset: dict) -> list[Finding]:
    """Keep the first of the categories declared more than once with the same "id": COCO evaluation lists the
    categories' ids, and would evaluate (and weigh in the mean AP) such a category once per declaration."""
    first: dict[int, dict] = {}
    repeats = []
    for category in dataset["categories"]:
        if category["id"] in first:
            repeats.append(category)
        else:
            first[category["id"]] = category
    dataset["categories"] = list(first.values())
    return make_findings('categories declared more than once with the same "id"', repeats,
                         lambda c: f'id {c["id"]}: {c.get("name", "?")!r} after {first[c["id"]].get("name", "?")!r}',
                         "the first declaration is used (its name); remove the repeats from \"categories\"")


def fill_missing_iscrowd(dataset: dict) -> list[Finding]:
    """Set a missing or invalid "iscrowd" (not 0 or 1) to 0; COCO evaluation reads it for every box."""
    bad = [a for a in dataset["annotations"] if a.get("iscrowd") not in (0, 1)]
    for ann in bad:
        ann["iscrowd"] = 0
    return make_findings('annotations without a valid "iscrowd" (0 or 1)', bad, _annotation_name,
                         "treated as 0 (not crowd)")


def box_geometry_findings(dataset: dict) -> list[Finding]:
    """Boxes with zero or negative width/height, entirely outside or partly outside their image (the JSON's
    "width"/"height"). Left as they are: training clips them and drops the empty ones, as the reference."""
    sizes = {image["id"]: (image["width"], image["height"]) for image in dataset["images"]}
    empty, outside, partly = [], [], []
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            empty.append(ann)
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            outside.append(ann)
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            partly.append(ann)

    def example(ann: dict) -> str:
        width, height = sizes[ann["image_id"]]
        return f'{_annotation_name(ann)}: {_short_json(ann["bbox"])} in a {width:g}x{height:g} image'

    return [
        *make_findings("boxes with zero or negative width or height", empty, example,
                       "left out of the training targets (kept in the evaluation ground truth, as in the reference)"),
        *make_findings("boxes entirely outside their image", outside, example, "left out of the training targets"),
        *make_findings("boxes partly outside their image", partly, example, "clipped to the image for training"),
    ]


def undeclared_category_findings(dataset: dict) -> list[Finding]:
    """Annotations whose "category_id" is not in "categories": COCO evaluation only scores declared ones."""
    declared = {category["id"] for category in dataset["categories"]}
    undeclared = [a for a in dataset["annotations"] if a["category_id"] not in declared]
    return make_findings('annotations whose "category_id" is not declared in "categories"', undeclared,
                         lambda a: f'{_annotation_name(a)}: category_id {a["category_id"]}',
                         'trained on, but COCO evaluation ignores them; declare the category in "categories"')


def crowd_findings(dataset: dict) -> list[Finding]:
    """Images whose every annotation is a crowd region (``iscrowd`` 1: not a training target, ignored by COCO
    evaluation), and a file without a single non-crowd box (training sees no object, evaluation gives -1).
    Call after :func:`fill_missing_iscrowd`."""
    crowd_boxes: Counter[int] = Counter()
    with_objects = set()
    for ann in dataset["annotations"]:
        if ann["iscrowd"]:
            crowd_boxes[ann["image_id"]] += 1
        else:
            with_objects.add(ann["image_id"])
    crowd_only = [image for image in dataset["images"] if crowd_boxes[image["id"]] and image["id"] not in with_objects]
    findings = make_findings(
        "images whose every annotation is a crowd region (iscrowd 1)", crowd_only,
        lambda image: f'{image["file_name"]} (crowd boxes: {crowd_boxes[image["id"]]})',
        f"trained on as images without objects ({sum(crowd_boxes[i['id']] for i in crowd_only)} crowd boxes on them "
        "in all: crowd regions are no training target and COCO evaluation ignores them)")
    if dataset["images"] and not with_objects:
        count = len(dataset["annotations"])
        held = f"{count} annotations, all crowd regions" if count else "no annotation"
        findings += make_findings(
            "images in a file without one non-crowd box to learn from or evaluate", dataset["images"],
            lambda image: image["file_name"],
            f"training sees no object and COCO evaluation has no ground truth (its stats are -1): the file has "
            f'{held}. Check that this is the right annotation file and its "iscrowd" values')
    return findings


def clean_annotations(dataset: dict, img_folder: Path, *, images_only: bool = False) -> list[Finding]:
    """Every fixable problem of a checked ``dataset`` (see :func:`read_annotation_file`), fixed in place:
    missing images and malformed boxes dropped, "area"/"iscrowd" filled in, repeated categories dropped,
    annotation ids from 0 renumbered; repeated image files reported. ``images_only`` (an image-info file): no
    finding about images without boxes, which is what such a file is."""
    return [
        *drop_missing_images(dataset, img_folder),
        *duplicate_image_findings(dataset),
        *deduplicate_categories(dataset),
        *drop_malformed_boxes(dataset),
        *fill_missing_areas(dataset),
        *fill_missing_iscrowd(dataset),
        *([] if images_only else crowd_findings(dataset)),
        *box_geometry_findings(dataset),
        *undeclared_category_findings(dataset),
        *renumber_annotation_ids(dataset),
    ]


def report_findings(findings: Iterable[Finding], ann_file: str | Path, strict_data: bool) -> None:
    """Log one warning per finding; with ``strict_data`` raise InputError for the first one with a ``fix``."""
    for finding in findings:
        if strict_data and finding.fix:
            raise InputError(f"{ann_file}: {finding.problem}: {finding.count} (e.g. {', '.join(finding.examples)})"
                             f": {finding.fix} (without --strict_data they are {finding.action})")
        strict_note = "; --strict_data makes this an error" if finding.fix else ""
        logger.warning("%s: %s%s", ann_file, finding, strict_note)


# ----------------------------------------------------------------------------------------------
# Category ids and num_classes


def _all_category_ids(dataset: dict) -> set[int]:
    """Category ids declared in ``categories`` or used by any annotation."""
    ids = {int(c["id"]) for c in dataset["categories"]}
    ids.update(int(a["category_id"]) for a in dataset["annotations"])
    return ids


def num_classes_for(dataset: dict) -> int:
    """``num_classes`` suited to a checked ``dataset``: 91 (the COCO convention) when every category id is
    <= 90, else ``max id + 1``."""
    ids = _all_category_ids(dataset)
    if not ids or max(ids) <= COCO_NUM_CLASSES - 1:
        return COCO_NUM_CLASSES
    return max(ids) + 1


def default_num_classes(ann_file: str | Path) -> int:
    """:func:`num_classes_for` the annotation file ``ann_file``."""
    return num_classes_for(read_annotation_file(ann_file))


def num_classes_problem(dataset: dict, num_classes: int, ann_file: str | Path) -> Optional[str]:
    """Why ``num_classes`` logits cannot predict every category id of ``dataset``, or None if they can."""
    bad = sorted(i for i in _all_category_ids(dataset) if i >= num_classes)
    if not bad:
        return None
    return (f"category id {bad[-1]} in {ann_file} is >= num_classes={num_classes} "
            f"(all offending ids: {bad[:10]}{' ...' if len(bad) > 10 else ''}); the classifier has no "
            f"output for it. Pass --num_classes {num_classes_for(dataset)} (max category id + 1, "
            "or 91 for standard COCO ids) or fix the annotation file.")


def negative_category_problem(dataset: dict, ann_file: str | Path) -> Optional[str]:
    """Why the negative category ids of ``dataset`` cannot be used (they would wrap around to the last class of
    the classifier), or None if there are none."""
    anns = [a for a in dataset["annotations"] if a["category_id"] < 0]
    categories = [c for c in dataset["categories"] if c["id"] < 0]
    if not anns and not categories:
        return None
    counts = [f'{len(anns)} annotations with a negative "category_id"'] if anns else []
    counts += [f'{len(categories)} categories with a negative "id"'] if categories else []
    examples = [f'annotation {a["id"]}: category_id {a["category_id"]}' for a in anns[:MAX_EXAMPLES]]
    examples += [f'category {c["id"]} ({c.get("name", "?")})' for c in categories[:MAX_EXAMPLES]]
    return (f"{ann_file} has {' and '.join(counts)} (e.g. {', '.join(examples)}); category ids must be >= 0: the "
            "classifier has one output per id 0 .. num_classes - 1 and a negative id would wrap around to the last "
            'one. Renumber these categories to unused ids >= 0 in "categories" and in the annotations\' '
            '"category_id".')


def check_category_ids(dataset: dict, num_classes: Optional[int], ann_file: str | Path) -> None:
    """Raise InputError if some category id is negative or (with ``num_classes``) cannot be predicted by
    ``num_classes`` logits."""
    problem = negative_category_problem(dataset, ann_file)
    if problem is None and num_classes is not None:
        problem = num_classes_problem(dataset, num_classes, ann_file)
    if problem:
        raise InputError(problem)
