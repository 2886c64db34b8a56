"""The Python inference API: a detector from a checkpoint, a model folder or a run folder, run on image files,
PIL images or tensors with the validation preprocessing.

    from inference import Detector
    detector = Detector.from_checkpoint("exps/r50_sparse_detr_rho_0.1/checkpoint.pth", device="cuda")
    for det in detector(["dog.jpg", "cat.png"], threshold=0.5):
        print(det["boxes"], det["scores"], det["names"])
    detector.save("exps/sparse_detr_model")      # config.json + model.safetensors
    Detector.from_checkpoint("exps/sparse_detr_model")

The model is rebuilt from the checkpoint's model description (``models.description``; older checkpoints: their
stored ``args``), so its sizes and class names come back too. Official checkpoints hold weights only: give
``flags``, main.py flags (a list) or a configs/*.sh script. Flags given on top of a description override it
(a warning names both values; an override the weights cannot serve is refused). Each image is resized so its
shorter side is ``val_size`` (longer at most ``max_size``; by default the model's), normalised by the model's
mean and std, and batched with zero padding at the bottom and right. tools/predict.py,
tools/visualize_sparsity.py, tools/export_onnx.py and hubconf.py build on this.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import PIL.Image
import torch
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from datasets.coco_names import category_names
from datasets.images import UNREADABLE_IMAGE_ERRORS, open_rgb_image, to_8_bits
from datasets.transforms import make_coco_transforms
from main import get_args_parser, validate_args
from model_config import adopt_stored_flags, config_script_flags, explicit_flags, stored_flags
from models import build_inference_model, load_weights_strict
from models.description import ModelDescription
from util.checkpoint import CheckpointMismatchError, load_checkpoint, model_state
from util.errors import InputError
from util.misc import nested_tensor_from_tensor_list

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, PIL.Image.Image, Tensor]
Flags = Union[None, Sequence[str], str, Path]
MODEL_FOLDER_FORMAT = "sparse-detr model folder"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def resolve_flags(flags: Flags) -> list[str]:
    """``flags`` as a list of main.py flags: None -> [], a path to a configs/*.sh script -> its flags."""
    if flags is None:
        return []
    if isinstance(flags, (str, Path)):
        return config_script_flags(flags)
    if not all(isinstance(flag, str) for flag in flags):
        raise InputError(f"flags must be main.py flags as strings (or a configs/*.sh path), got {list(flags)!r}")
    return list(flags)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InputError(f"model flags: {message}")


def describe(flags: Sequence[str], stored: Optional[Mapping[str, Any]] = None, *, source: Any = "the checkpoint",
             device: str = "cpu") -> ModelDescription:
    """The description of the model to build: main.py's ``flags`` over the checkpoint's ``stored`` model
    (``model_config.stored_flags``; None for weights-only files). Flags of training never enter it, so they
    never block loading. A bad flag raises a one-line InputError."""
    parser = _OneLineParser(parents=[get_args_parser()], add_help=False)
    args = parser.parse_args(["--device", device, *flags])
    if stored is not None:
        adopt_stored_flags(args, stored, explicit_flags(parser, flags), source=source, strict=True)
    try:
        args = validate_args(args)
    except SystemExit as err:  # validate_args lists the problems on several lines
        raise InputError(" ".join(str(err.code).split())) from None
    description = ModelDescription.from_flags(vars(args))
    if stored is not None and "categories" in stored:
        description = dataclasses.replace(description, categories=ModelDescription.from_dict(stored).categories,
                                          mean=tuple(stored["mean"]), std=tuple(stored["std"]))
    return description


def read_model(path: str | Path, *, trust: bool = False) -> tuple[dict[str, Any], Path]:
    """``(checkpoint dict, the file read)`` of a checkpoint file, a model folder (``config.json`` +
    ``model.safetensors``, see :meth:`Detector.save`) or a run folder (its ``checkpoint.pth``)."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        config = _read_config(path / CONFIG_FILE)
        from safetensors.torch import load_file
        return {"model": load_file(path / WEIGHTS_FILE), "model_description": config["model_description"]}, path
    if path.is_dir() and (path / "checkpoint.pth").is_file():
        path = path / "checkpoint.pth"
    return load_checkpoint(path, trust=trust), path


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path.parent} holds {WEIGHTS_FILE} but no {CONFIG_FILE}: a model folder needs both "
                         "(write them with Detector.save)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not JSON ({err})") from None
    if not isinstance(config, dict) or "model_description" not in config:
        raise InputError(f"{path} holds no model_description: not a model folder's config")
    return config


def load_model(path: str | Path, flags: Flags = None, device: str = "cpu", *, trust: bool = False,
               weights: str = "raw") -> tuple[nn.Module, nn.Module, ModelDescription]:
    """``(model in eval mode on device, bbox postprocessor, description)`` of a checkpoint, model folder or run
    folder (``trust``: see ``--trust_checkpoint``; ``weights``: "raw" or "ema"). Raises InputError /
    FileNotFoundError with a one-paragraph message."""
    if not isinstance(trust, bool):
        raise InputError(f"trust must be True or False, got {trust!r}")
    checkpoint, source = read_model(path, trust=trust)
    state = model_state(checkpoint, weights, source=source)
    given = resolve_flags(flags)
    stored = stored_flags(checkpoint, source=source)
    description = describe(given, stored, source=source, device=device)
    model, postprocessors = build_inference_model(description)
    built_as = "the model flags given" if stored is None else "the model stored in it" + (
        " and the flags given" if given else "")
    try:
        load_weights_strict(model, {**checkpoint, "model": state}, source,
                            current_flags=dataclasses.asdict(description), built_as=built_as)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{err}\nHere: give the checkpoint's model flags (tools: after --, e.g. -- "
                                      "--with_box_refine --two_stage; or a configs/*.sh script)") from None
    nonfinite = [name for name, tensor in model.state_dict().items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if nonfinite:
        logger.warning("%s holds non-finite weights in %d tensors (e.g. %s): its detections will be empty or "
                       "wrong; use an earlier checkpoint of the run", source, len(nonfinite), nonfinite[:3])
    return model.to(device).eval(), postprocessors["bbox"], description


def check_device(device: Any) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1" or a torch.device) as a torch.device that is available here."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: CUDA is not available here (no GPU, or a CPU-only PyTorch); use 'cpu'")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None


def _size(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive whole number of pixels, got {value!r}")
    return value


def to_pil(image: ImageInput) -> PIL.Image.Image:
    """An RGB 8-bit PIL image of a path, a PIL image (16-bit and float ones scaled as their files are, see
    ``datasets.images.to_8_bits``), or a [3, H, W] tensor: uint8, or float in [0, 1], rounded to the nearest of
    the 256 levels (the validation transform works on 8-bit images)."""
    if isinstance(image, (str, Path)):
        try:
            return open_rgb_image(Path(image))
        except FileNotFoundError:
            raise InputError(f"image not found: {image}") from None
        except UNREADABLE_IMAGE_ERRORS as err:
            raise InputError(f"cannot read image {image} ({err}): give an image file PIL can decode") from None
    if isinstance(image, PIL.Image.Image):
        return to_8_bits(image)[0].convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise InputError(f"an image tensor must be [3, H, W] (RGB, channels first), got {list(image.shape)}")
        if image.dtype != torch.uint8:
            if not image.is_floating_point():
                raise InputError(f"an image tensor must be uint8 or float in [0, 1], got {image.dtype}")
            low, high = float(image.min()), float(image.max())
            if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 1:
                raise InputError(f"a float image tensor must hold values in [0, 1], got {low:g}..{high:g}; divide "
                                 "0-255 values by 255 (e.g. read_image(path).float() / 255), or pass the uint8 tensor")
            image = (image.detach().float() * 255).round().to(torch.uint8)
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

    def __init__(self, *, model: nn.Module, postprocessor: nn.Module, description: ModelDescription,
                 device: Union[str, torch.device] = "cpu", val_size: Optional[int] = None,
                 max_size: Optional[int] = None, class_names: Optional[Mapping[int, str]] = None,
                 batch_size: int = 4):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        self.device = check_device(device)
        self.model = model.to(self.device).eval()
        self.postprocessor = postprocessor
        self.description = description
        self.val_size = _size("val_size", val_size, description.val_size)
        self.max_size = _size("max_size", max_size, description.max_size)
        self.class_names = dict(class_names if class_names is not None else
                                description.class_names() or category_names(description.num_classes))
        self.batch_size = batch_size
        self.transform = make_coco_transforms("val", val_size=self.val_size, max_size=self.max_size,
                                              mean=description.mean, std=description.std)

    @classmethod
    def from_checkpoint(cls, path: str | Path, flags: Flags = None, *, device: str = "cpu", weights: str = "raw",
                        trust: bool = False, categories: Union[None, str, Path, Mapping[str, Any]] = None,
                        val_size: Optional[int] = None, max_size: Optional[int] = None,
                        batch_size: int = 4) -> "Detector":
        """Load ``path``: a checkpoint of this codebase, a model folder (:meth:`save`), a run folder, or an
        official checkpoint with ``flags`` (main.py flags or a configs/*.sh path; over a stored model they
        override it). ``weights``: "raw" or "ema" (the moving average, when the checkpoint has it); ``trust``:
        unpickle without restriction (``--trust_checkpoint``); ``categories``: a COCO-format annotation file (or
        dict) naming the classes, by default the training set's; sizes default to the model's."""
        torch_device = check_device(device)
        model, postprocessor, description = load_model(path, flags, str(torch_device), trust=trust, weights=weights)
        names = None if categories is None else _named_categories(description.num_classes, categories)
        return cls(model=model, postprocessor=postprocessor, description=description, device=torch_device,
                   val_size=val_size, max_size=max_size, class_names=names, batch_size=batch_size)

    @classmethod
    def from_flags(cls, flags: Flags, *, device: str = "cpu", seed: int = 0, **kwargs) -> "Detector":
        """A randomly initialised detector of ``flags`` (seeded): for tests and export checks, not for use."""
        description = describe(resolve_flags(flags), device=str(check_device(device)))
        torch.manual_seed(seed)
        model, postprocessors = build_inference_model(description)
        categories = kwargs.pop("categories", None)
        names = None if categories is None else _named_categories(description.num_classes, categories)
        return cls(model=model, postprocessor=postprocessors["bbox"], description=description, device=device,
                   class_names=names, **kwargs)

    def save(self, folder: str | Path) -> Path:
        """Write a model folder: ``config.json`` (the model description) and ``model.safetensors`` (the weights,
        no pickle). :meth:`from_checkpoint` and the tools read it back."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"format": MODEL_FOLDER_FORMAT, "version": 1, "model_description": self.description.to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        # Shared heads appear under two keys; safetensors stores each key's own copy.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": MODEL_FOLDER_FORMAT})
        return folder

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> tuple[Any, Tensor]:
        """RGB images -> (NestedTensor of normalised, resized, padded images on the device, their original
        sizes [B, 2] (h, w))."""
        tensors = [self.transform(image, None)[0] for image in images]
        sizes = torch.tensor([[image.height, image.width] for image in images], device=self.device)
        return nested_tensor_from_tensor_list(tensors).to(self.device), sizes

    @torch.no_grad()
    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], threshold: float = 0.0
                 ) -> list[dict[str, Any]]:
        """Detections of each image (see the class docstring) scoring at least ``threshold`` (in [0, 1]), in
        batches of ``batch_size``. ``images``: one or a list of paths, PIL images, [3, H, W] tensors, or a
        [B, 3, H, W] tensor."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise InputError(f"threshold must be a score in [0, 1], got {threshold!r}")
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


def _named_categories(num_classes: int, categories: Union[str, Path, Mapping[str, Any]]) -> dict[int, str]:
    """``category_names`` of a ``categories`` argument, its mistakes as one-line InputErrors."""
    if not isinstance(categories, (str, Path, Mapping)):
        raise InputError(f"categories must be a COCO-format annotation file or its dict, got a "
                         f"{type(categories).__name__}")
    try:
        return category_names(num_classes, categories)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"categories file {categories} is not JSON ({err})") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError("categories must hold a COCO 'categories' list of {id, name} entries") from None
