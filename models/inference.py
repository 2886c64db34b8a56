"""The Python inference API: a detector from a checkpoint (ours or an official one) and the model flags,
run on image files, PIL images or tensors with the validation preprocessing.

    from models.inference import Detector
    detector = Detector.from_checkpoint("exps/r50_sparse_detr_rho_0.1/checkpoint.pth", device="cuda")
    for det in detector(["dog.jpg", "cat.png"], threshold=0.5):
        print(det["boxes"], det["scores"], det["names"])

The model is rebuilt from the ``args`` stored in the checkpoint (ours store them); official checkpoints hold
weights only, so give ``flags``: main.py flags (a list) or a configs/*.sh script whose flags are read. Each
image is resized so its shorter side is ``val_size`` (longer at most ``max_size``; by default the model's
--val_size / --max_size), normalised by the ImageNet mean and std, and batched with zero padding at the
bottom and right. tools/predict.py, tools/visualize_sparsity.py and tools/export_onnx.py build on this.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import PIL.Image
import torch
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from datasets.coco_names import COCO_CATEGORY_NAMES
from datasets.images import UNREADABLE_IMAGE_ERRORS, open_rgb_image
from datasets.transforms import make_coco_transforms
from util.checkpoint import CheckpointMismatchError, load_checkpoint, model_state
from util.errors import InputError
from util.misc import nested_tensor_from_tensor_list

from . import build_model, load_weights_strict

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, PIL.Image.Image, Tensor]
Flags = Union[None, Sequence[str], str, Path]


def config_script_flags(path: str | Path) -> list[str]:
    """The main.py flags of a configs/*.sh script (the words after ``main.py``, up to ``"$@"``), without
    --output_dir (where training writes, nothing to do with the model)."""
    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in Path(__file__).resolve().parents[1].joinpath("configs").glob("*.sh")))
        raise InputError(f"config script not found: {path} (the configs are: {known})")
    words = shlex.split(path.read_text().replace("\\\n", " "), comments=True)
    after = [i for i, word in enumerate(words) if word.endswith("main.py")]
    if not after:
        raise InputError(f"{path} is not a config script: it runs no main.py (see configs/*.sh)")
    flags = []
    for word in words[after[0] + 1:]:
        if word == "$@":
            break
        flags.append(word)
    if "--output_dir" in flags:
        index = flags.index("--output_dir")
        del flags[index:index + 2]
    return flags


def resolve_flags(flags: Flags) -> list[str]:
    """``flags`` as a list of main.py flags: None -> [], a path to a configs/*.sh script -> its flags."""
    if flags is None:
        return []
    if isinstance(flags, (str, Path)):
        return config_script_flags(flags)
    return list(flags)


def parse_model_flags(flags: Sequence[str], device: str) -> argparse.Namespace:
    """main.py's args for ``flags`` (the backbone never loads ImageNet weights: a checkpoint or the caller
    sets every weight); a bad flag raises a one-line InputError."""
    from main import get_args_parser

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message: str):
            raise InputError(f"model flags {' '.join(flags)!r}: {message}")

    parser = OneLineParser(parents=[get_args_parser()], add_help=False)
    args = parser.parse_args(["--device", device, "--backbone_from_scratch", *flags])
    return _validated(args)


def _validated(args: argparse.Namespace) -> argparse.Namespace:
    from main import validate_args
    try:
        return validate_args(args)
    except SystemExit as err:  # validate_args lists the problems on several lines
        raise InputError(" ".join(str(err.code).split())) from None


def model_args(stored: Any, model_flags: Sequence[str], device: str) -> argparse.Namespace:
    """The model's arguments: ``model_flags`` when given (or nothing is stored), else the stored ``args`` laid
    over today's defaults (older and official checkpoints lack newer flags). The backbone is never initialised
    from ImageNet weights: the checkpoint replaces them."""
    from main import backbone_name, get_args_parser
    if model_flags or stored is None:
        return parse_model_flags(model_flags, device)
    saved = vars(stored) if isinstance(stored, argparse.Namespace) else dict(stored)
    parser = argparse.ArgumentParser(parents=[get_args_parser()], add_help=False)
    values = vars(parser.parse_args([]))
    values.update({k: v for k, v in saved.items() if k in values})
    values["backbone"] = backbone_name(values["backbone"])  # official Swin-T checkpoints store "swin-t"
    values.update(device=device, backbone_from_scratch=True, backbone_weights="", scrl_pretrained_path="",
                  resume="", finetune="", eval=False, output_dir="", overwrite=False)
    return _validated(argparse.Namespace(**values))


def select_weights(checkpoint: Mapping[str, Any], weights: str, source: str | Path) -> dict[str, Any]:
    """``checkpoint`` with the chosen set of weights under ``model``: ``"raw"`` (as trained) or ``"ema"`` (their
    moving average), picked by ``util.checkpoint.model_state``."""
    return {**checkpoint, "model": model_state(checkpoint, weights, source=source)}


def load_model(checkpoint_path: str | Path, model_flags: Sequence[str], device: str, *, trust: bool = False,
               weights: str = "raw") -> tuple[nn.Module, nn.Module, argparse.Namespace]:
    """``(model in eval mode on device, bbox postprocessor, args)`` for a checkpoint (``trust``: see
    ``--trust_checkpoint``). Raises InputError / FileNotFoundError with a one-paragraph message."""
    path = Path(checkpoint_path)
    checkpoint = select_weights(load_checkpoint(path, trust=trust), weights, path)
    args = model_args(checkpoint.get("args"), model_flags, device)
    model, _, postprocessors = build_model(args, load_backbone_weights=False)
    source = "the model flags given" if model_flags or "args" not in checkpoint else "the args stored in it"
    try:
        load_weights_strict(model, checkpoint, path, current_flags=vars(args), built_as=source)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{err}\nHere: give the checkpoint's model flags (tools: after --, e.g. -- "
                                      "--with_box_refine --two_stage; or a configs/*.sh script)") from None
    return model.to(device).eval(), postprocessors["bbox"], args


def category_names(num_classes: int, categories: Union[None, str, Path, Mapping[str, Any]]) -> dict[int, str]:
    """Names by category id: from ``categories`` (a COCO-format annotation file or its loaded dict), else COCO's
    for 91-class models, else none (ids are shown)."""
    if isinstance(categories, (str, Path)):
        if not Path(categories).is_file():
            raise InputError(f"categories file not found: {categories}")
        categories = json.loads(Path(categories).read_text())
    if categories is not None:
        return {int(c["id"]): str(c["name"]) for c in categories.get("categories", [])}
    return dict(COCO_CATEGORY_NAMES) if num_classes == 91 else {}


def to_pil(image: ImageInput) -> PIL.Image.Image:
    """An RGB 8-bit PIL image of a path, a PIL image, or a [3, H, W] tensor (uint8, or float in [0, 1], which is
    rounded to 8 bits: the validation transform works on PIL images)."""
    if isinstance(image, (str, Path)):
        try:
            return open_rgb_image(Path(image))
        except FileNotFoundError:
            raise InputError(f"image not found: {image}") from None
        except UNREADABLE_IMAGE_ERRORS as err:
            raise InputError(f"cannot read image {image} ({err}): give an image file PIL can decode") from None
    if isinstance(image, PIL.Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise InputError(f"an image tensor must be [3, H, W] (RGB, channels first), got {list(image.shape)}")
        if image.dtype != torch.uint8:
            if not image.is_floating_point():
                raise InputError(f"an image tensor must be uint8 or float in [0, 1], got {image.dtype}")
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return TF.to_pil_image(image.cpu())
    raise InputError(f"cannot read an image from a {type(image).__name__}: give a path, a PIL image or a "
                     "[3, H, W] tensor")


class Detector:
    """A detector in eval mode with its preprocessing and class names.

    ``detector(images)`` -> one dict per image: ``boxes`` [N, 4] float (x0, y0, x1, y1) in the image's pixels,
    ``scores`` [N], ``labels`` [N] int64 category ids, ``names`` N strings (the id when no name is known);
    best first. Focal models (the Deformable DETR family) give their 100 best (query, class) pairs, DETR / SDETR
    every query with its best class, before ``threshold``.
    """

    def __init__(self, *, model: nn.Module, postprocessor: nn.Module, device: Union[str, torch.device],
                 val_size: int = 800, max_size: int = 1333, class_names: Optional[Mapping[int, str]] = None,
                 batch_size: int = 4):
        self.model = model.to(device).eval()
        self.postprocessor = postprocessor
        self.device = torch.device(device)
        self.class_names = dict(class_names or {})
        self.batch_size = batch_size
        self.transform = make_coco_transforms("val", val_size=val_size, max_size=max_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, flags: Flags = None, *, device: str = "cpu", weights: str = "raw",
                        trust: bool = False, categories: Union[None, str, Path, Mapping[str, Any]] = None,
                        val_size: Optional[int] = None, max_size: Optional[int] = None,
                        batch_size: int = 4) -> "Detector":
        """Load ``path`` (a checkpoint of this repo, or an official one with ``flags``: a list of main.py flags or
        a configs/*.sh path). ``weights``: "raw" or "ema" (the moving average, when the checkpoint has it);
        ``trust``: unpickle without restriction (``--trust_checkpoint``); ``categories``: a COCO-format
        annotation file (or dict) naming the classes; sizes default to the model's --val_size / --max_size."""
        model, postprocessor, args = load_model(path, resolve_flags(flags), device, trust=trust, weights=weights)
        return cls(model=model, postprocessor=postprocessor, device=device, val_size=val_size or args.val_size,
                   max_size=max_size or args.max_size, class_names=category_names(args.num_classes, categories),
                   batch_size=batch_size)

    @classmethod
    def from_flags(cls, flags: Flags, *, device: str = "cpu", seed: int = 0, **kwargs) -> "Detector":
        """A randomly initialised detector of ``flags`` (seeded): for tests and export checks, not for use."""
        args = parse_model_flags(resolve_flags(flags), device)
        torch.manual_seed(seed)
        model, _, postprocessors = build_model(args, load_backbone_weights=False)
        return cls(model=model, postprocessor=postprocessors["bbox"], device=device,
                   val_size=kwargs.pop("val_size", None) or args.val_size,
                   max_size=kwargs.pop("max_size", None) or args.max_size,
                   class_names=category_names(args.num_classes, kwargs.pop("categories", None)), **kwargs)

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> tuple[Any, Tensor]:
        """RGB images -> (NestedTensor of normalised, resized, padded images on the device, their original
        sizes [B, 2] (h, w))."""
        tensors = [self.transform(image, None)[0] for image in images]
        sizes = torch.tensor([[image.height, image.width] for image in images], device=self.device)
        return nested_tensor_from_tensor_list(tensors).to(self.device), sizes

    @torch.no_grad()
    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], threshold: float = 0.0
                 ) -> list[dict[str, Any]]:
        """Detections of each image (see the class docstring) scoring at least ``threshold``, in batches of
        ``batch_size``. ``images``: one or a list of paths, PIL images, [3, H, W] tensors, or a [B, 3, H, W]
        tensor."""
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        results = []
        for start in range(0, len(images), self.batch_size):
            batch = [to_pil(image) for image in images[start:start + self.batch_size]]
            samples, sizes = self.preprocess(batch)
            for dets in self.postprocessor(self.model(samples), sizes):
                results.append(self._format(dets, threshold))
        return results

    def _format(self, dets: Mapping[str, Tensor], threshold: float) -> dict[str, Any]:
        order = dets["scores"].argsort(descending=True)
        keep = order[dets["scores"][order] >= threshold]
        out = {"boxes": dets["boxes"][keep].float().cpu(), "scores": dets["scores"][keep].cpu(),
               "labels": dets["labels"][keep].cpu()}
        out["names"] = [self.class_names.get(int(label), str(int(label))) for label in out["labels"]]
        return out
