"""torch.hub entry points, as facebookresearch/detr has them: build a trained detector from a checkpoint, a
model folder (config.json + model.safetensors) or a run folder, with its stored sizes and class names.

    detector = torch.hub.load("path/to/this/repo", "detector", "exps/run/checkpoint.pth", source="local")
    detections = detector("dog.jpg", threshold=0.5)
    model, postprocessor = torch.hub.load("path/to/this/repo", "model", "exps/sparse_detr_model",
                                          source="local", return_postprocessor=True)

No weights are downloaded: the released checkpoints are files you fetch (README, "Model zoo"); official ones
store no description, so give ``flags`` (main.py flags or a configs/*.sh path).
"""
dependencies = ["torch", "torchvision", "scipy", "pycocotools", "timm", "safetensors"]

from inference import Detector  # noqa: E402


def detector(path, flags=None, *, device: str = "cpu", weights: str = "raw", **kwargs) -> Detector:
    """An ``inference.Detector`` (eval mode, on ``device``) of the checkpoint, model folder or run folder at
    ``path``: call it on image paths, PIL images or [3, H, W] tensors for boxes in pixels, scores, labels and
    names. ``flags``: main.py flags or a configs/*.sh path (official checkpoints); ``weights``: "raw" or "ema";
    the other keywords as ``Detector.from_checkpoint`` takes them (categories, val_size, max_size, batch_size,
    trust)."""
    return Detector.from_checkpoint(path, flags, device=device, weights=weights, **kwargs)


def model(path, flags=None, *, device: str = "cpu", weights: str = "raw", return_postprocessor: bool = False,
          **kwargs):
    """The ``torch.nn.Module`` of the checkpoint, model folder or run folder at ``path``, in eval mode: it takes a
    ``util.misc.NestedTensor`` of normalised images (or a list of [3, H, W] tensors) and returns the output dict
    of its family (``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] normalised cx, cy, w, h, ...). With
    ``return_postprocessor`` also the module that turns those outputs and the [B, 2] (h, w) image sizes into
    absolute x0, y0, x1, y1 boxes, as DETR's hub entries return it."""
    built = Detector.from_checkpoint(path, flags, device=device, weights=weights, **kwargs)
    return (built.model, built.postprocessor) if return_postprocessor else built.model
