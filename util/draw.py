"""Boxes with captions drawn on images (PIL): the PNGs of tools/predict.py and tools/browse_dataset.py and the
detection images of --tensorboard_images."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

logger = logging.getLogger(__name__)

# One colour per category id (id modulo its length).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def category_color(category_id: int) -> tuple[int, int, int]:
    return PALETTE[category_id % len(PALETTE)]


def caption_font(image_size: tuple[int, int]) -> PIL.ImageFont.ImageFont:
    """PIL's default font at a size that suits an image of ``image_size`` (w, h)."""
    font_size = max(10, min(image_size) // 40)
    try:
        return PIL.ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


def caption_box(box_xy: tuple[float, float], text_wh: tuple[int, int], image_wh: tuple[int, int]
                ) -> tuple[int, int, int, int]:
    """The filled label (left, top, right, bottom; inclusive pixels) of a caption ``text_wh`` (w, h) for a box
    whose top-left corner is ``box_xy``, in an image of ``image_wh``: above the box, or inside it at its top
    when there is no room above; moved left and up as far as needed to stay inside the image (a label wider
    or taller than the image starts at its left or top edge)."""
    (x0, y0), (text_w, text_h), (width, height) = box_xy, text_wh, image_wh
    label_w, label_h = text_w + 4, text_h + 2
    top = y0 - label_h if y0 - label_h >= 0 else y0
    left = max(0, min(int(x0), width - 1 - label_w))
    top = max(0, min(int(top), height - 1 - label_h))
    return left, top, left + label_w, top + label_h


def draw_boxes(canvas: PIL.Image.Image, boxes_xyxy: Sequence[Sequence[float]], colors: Sequence[tuple[int, int, int]],
               captions: Optional[Sequence[str]] = None, line_width: Optional[int] = None) -> None:
    """Draw on ``canvas`` (in place) each box (absolute xyxy pixels of ``canvas``: the outline's left and top
    pixel columns are at x0 and y0, its right and bottom ones at x1 and y1) in its colour, with its caption
    (none for "") on a filled label above the box, or inside it at the top edge of the image; labels are kept
    inside the image (:func:`caption_box`), so a box at the right or bottom edge keeps its whole caption. Later
    boxes are drawn over earlier ones. ``line_width`` defaults to 1 px per 300 px of the shorter image side."""
    draw = PIL.ImageDraw.Draw(canvas)
    font = caption_font(canvas.size)
    width = line_width or max(1, min(canvas.size) // 300)
    captions = captions if captions is not None else [""] * len(boxes_xyxy)
    for (x0, y0, x1, y1), color, text in zip(boxes_xyxy, colors, captions):
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label = caption_box((x0, y0), (right - left, bottom - top), canvas.size)
        draw.rectangle(label, fill=color)
        draw.text((label[0] + 2 - left, label[1] + 1 - top), text, fill=(255, 255, 255), font=font)
