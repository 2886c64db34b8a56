"""Show what Sparse DETR keeps: the image, the token-selection rule's scores per level (the DAM rule's saliency,
the objectness rule's objectness), the kept tokens and the decoder attention map (DAM), in one PNG.

    python tools/visualize_sparsity.py --resume exps/r50_sparse_detr_rho_0.1/checkpoint.pth \
        --image dog.jpg --out sparsity.png

The model is rebuilt from the ``args`` stored in the checkpoint (our checkpoints), or from the
model flags given after ``--`` (official checkpoints hold weights only), e.g.
``-- --with_box_refine --two_stage --eff_query_init --eff_specific_head --rho 0.1 --use_enc_aux_loss``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.images import UNREADABLE_IMAGE_ERRORS, open_rgb_image  # noqa: E402
from models.dam import attention_map_to_token_grid  # noqa: E402
from inference import Detector  # noqa: E402
from tools.plot_logs import figure_path  # noqa: E402
from util.errors import InputError  # noqa: E402


def load_detector(checkpoint_path: str, model_flags: list[str], device: str, size: Optional[int],
                  max_size: Optional[int]) -> Detector:
    """The Sparse DETR detector of a checkpoint or model folder, in eval mode (see ``inference.py``), at the
    model's sizes unless ``size`` / ``max_size`` are given; SystemExit with one paragraph when it cannot be used
    or is not a Sparse DETR model."""
    try:
        detector = Detector.from_checkpoint(checkpoint_path, model_flags, device=device, val_size=size,
                                            max_size=max_size)
    except (FileNotFoundError, InputError) as err:
        raise SystemExit(str(err)) from None
    if not detector.description.rho:
        raise SystemExit(f"{checkpoint_path} is not a Sparse DETR model (rho = 0): nothing to visualise")
    return detector


def read_image(path: str | Path) -> PIL.Image.Image:
    """The RGB 8-bit image of ``path`` (16-bit and float pixels scaled, see datasets/images.py); SystemExit if it
    cannot be decoded."""
    try:
        return open_rgb_image(Path(path))
    except UNREADABLE_IMAGE_ERRORS as err:
        raise SystemExit(f"cannot read image {path} ({err}): give an image file PIL can decode (JPEG, PNG, "
                         "...)") from None


def per_level_maps(values: torch.Tensor, spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
    """[S] token values -> one [H_l, W_l] map per level."""
    return [v.view(h, w) for v, (h, w) in zip(values.split(spatial_shapes.prod(1).tolist()), spatial_shapes.tolist())]


@torch.no_grad()
def sparsity_maps(model: torch.nn.Module, samples) -> dict[str, list[torch.Tensor]]:
    """The selection rule's scores (sigmoid of its logits, named by the rule: saliency, objectness), kept tokens
    (0/1) and DAM, each per level, for one preprocessed image (a NestedTensor of one, or a one-element list of a
    [3, H, W] tensor)."""
    outputs = model(samples)
    shapes = outputs["spatial_shapes"]
    scores = outputs["backbone_mask_prediction"][0].sigmoid()
    kept = torch.zeros_like(scores)
    kept[outputs["backbone_topk_proposals"][0, :int(outputs["sparse_token_nums"][0])]] = 1
    dam = attention_map_to_token_grid(shapes, outputs["level_start_index"], outputs["sampling_locations_dec"],
                                      outputs["attn_weights_dec"])[0]
    return {name: per_level_maps(values.cpu(), shapes.cpu())
            for name, values in ((model.transformer.selector.SCORE_NAME, scores), ("kept tokens", kept),
                                 ("DAM", dam))}


def plot(image: PIL.Image.Image, maps: dict[str, list[torch.Tensor]], out: str | Path) -> None:
    levels = len(next(iter(maps.values())))
    fig, axes = plt.subplots(len(maps), levels + 1, figsize=(3 * (levels + 1), 2.6 * len(maps)), squeeze=False)
    for row, (name, level_maps) in enumerate(maps.items()):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("image" if row == 0 else "")
        axes[row, 0].set_ylabel(name)
        for level, level_map in enumerate(level_maps):
            # Saliency and kept tokens are on [0, 1]; the DAM is scaled per level.
            limits = {} if name == "DAM" else {"vmin": 0.0, "vmax": 1.0}
            axes[row, level + 1].imshow(level_map.numpy(), cmap="viridis", **limits)
            axes[row, level + 1].set_title(f"{name}, level {level} ({level_map.shape[0]}x{level_map.shape[1]})",
                                           fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if "--" in argv:
        split = argv.index("--")
        argv, model_flags = argv[:split], argv[split + 1:]
    else:
        model_flags = []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", required=True, help="checkpoint (or model folder) of a Sparse DETR model")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--out", required=True, help="PNG to write (its folder is created; .png appended to a name "
                                                     "without extension)")
    parser.add_argument("--size", type=int, default=None,
                        help="shorter side the image is resized to; default the model's --val_size")
    parser.add_argument("--max_size", type=int, default=None, help="longest side after resizing; default the model's")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if Path(args.image).is_dir():
        raise SystemExit(f"--image {args.image} is a folder: give a file")
    for path in (args.resume, args.image):
        if not Path(path).exists():
            raise SystemExit(f"file not found: {path}")
    image = read_image(args.image)
    out = figure_path(args.out)
    detector = load_detector(args.resume, model_flags, args.device, args.size, args.max_size)
    samples, _ = detector.preprocess([image])
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(image, sparsity_maps(detector.model, samples), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
