"""Show what Sparse DETR keeps: the image, the token-selection rule's scores per level (the DAM rule's saliency,
the objectness rule's objectness; with a colour bar), the kept tokens drawn over the image ("kept N of M tokens"
per level and in all) and the decoder attention map (DAM), in one PNG.

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


def kept_per_level(kept_maps: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(kept, tokens) of each level's 0/1 kept map (one image, no padding: every token is valid)."""
    return [(int(level_map.sum()), level_map.numel()) for level_map in kept_maps]


def figure(image: PIL.Image.Image, maps: dict[str, list[torch.Tensor]], rho: float):
    """The figure: the image once (top left); per level, the saliency, the kept tokens over the image ("kept N
    of M tokens"), and the DAM; a colour bar per row. Each level's token grid is stretched over the image (its
    last row and column may reach past the image's edge by part of a stride)."""
    levels = len(maps["saliency"])
    rows = ("saliency", "kept tokens", "DAM")
    fig, axes = plt.subplots(len(rows), levels + 1, figsize=(3 * (levels + 1) + 1, 2.6 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image")
    for row in range(1, len(rows)):
        axes[row, 0].axis("off")
    counts = kept_per_level(maps["kept tokens"])
    kept, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    extent = (0, image.width, image.height, 0)
    for level in range(levels):
        h, w = maps["saliency"][level].shape
        saliency = axes[0, level + 1].imshow(maps["saliency"][level].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        axes[0, level + 1].set_title(f"saliency, level {level} ({h}x{w})", fontsize=8)
        ax = axes[1, level + 1]
        ax.imshow(image, extent=extent)
        # Kept tokens tinted yellow, dropped ones shaded dark: the image shows through both.
        kept_map = maps["kept tokens"][level]
        overlay = torch.zeros(h, w, 4)
        overlay[..., :3] = kept_map[..., None] * torch.tensor([1.0, 0.9, 0.0])
        overlay[..., 3] = torch.where(kept_map > 0, 0.35, 0.6)
        ax.imshow(overlay.numpy(), extent=extent, interpolation="nearest")
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        n, m = counts[level]
        ax.set_title(f"level {level}: kept {n} of {m} tokens ({n / m:.2f})", fontsize=8)
        dam = axes[2, level + 1].imshow(maps["DAM"][level].numpy(), cmap="magma")
        axes[2, level + 1].set_title(f"DAM, level {level} (scaled per level)", fontsize=8)
        if level == levels - 1:
            fig.colorbar(saliency, ax=list(axes[0, 1:]), label="score (sigmoid)", shrink=0.9)
            fig.colorbar(dam, ax=list(axes[2, 1:]), label="DAM (last level)", shrink=0.9)
    axes[1, 0].text(0.5, 0.5, f"kept {kept} of {total} tokens\n(rho = {rho:g})", ha="center", va="center",
                    transform=axes[1, 0].transAxes)
    return fig


def plot(image: PIL.Image.Image, maps: dict[str, list[torch.Tensor]], rho: float, out: str | Path) -> None:
    fig = figure(image, maps, rho)
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
    plot(image, sparsity_maps(detector.model, samples), detector.model.transformer.rho, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
