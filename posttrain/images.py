"""Images in: loading, Pan & Scan, pixel values, and chat rows with images.

    cfg = ImageConfig()                                   # the released models' preprocessing
    pixels, crops = preprocess([load_image("cat.jpg", "row 0")], cfg)     # (N, 3, 896, 896), [0]
    enc = encode_chat(tok, messages, images, cfg)         # ids, loss_mask, token_type_ids, pixel_values

Preprocessing is the released models' (their preprocessor_config.json, as transformers' PIL image
processor runs it): RGB (transparency on white), bilinear resize to 896 x 896, x / 255, then (x - 0.5) / 0.5, channels first,
float32. Pan & Scan (the Gemma 3 report, section 2.1: an inference-time option) cuts an image whose
aspect ratio is at least 1.2 into 2-4 equal crops of at least 256 pixels along its long side; each
crop follows the original as another image of its own.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import UserError
from .tokenizer import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID, Tokenizer


@dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing; defaults are the released Gemma 3 models' (not transformers' class defaults)."""

    size: int = 896  # the vision tower's image_size
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2
    tokens_per_image: int = 256  # the model's mm_tokens_per_image


def image_config(model_cfg, pan_and_scan: bool = False) -> ImageConfig | None:
    """How a model reads images (its tower's image size and tokens per image); None for a text-only model."""
    vision = getattr(model_cfg, "vision", None)
    if vision is None:
        return None
    return ImageConfig(size=vision.image_size, tokens_per_image=vision.mm_tokens_per_image, pan_and_scan=pan_and_scan)


def load_image(source: Any, where: str):
    """A PIL image in RGB from a path, bytes, a PIL image, or a `datasets` Image value ({"bytes", "path"}).

    A file or bytes is decoded here and turned upright by its EXIF orientation, as `datasets` decodes an
    Image column and transformers' `load_image` opens a file; a PIL image is taken as already decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, dict):  # the datasets Image feature's storage form
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source).expanduser()
            if not path.is_file():
                raise UserError(f"{where}: image file {path} does not exist (fix: correct the path, relative to the "
                                "working directory, or drop the row)")
            what, opener = str(path), path
        elif isinstance(source, (bytes, bytearray)):
            what, opener = f"{len(source)} image bytes", io.BytesIO(source)
        else:
            raise UserError(f"{where}: an image must be a path, bytes, a PIL image or a datasets Image value, "
                            f"got {type(source).__name__}")
        try:
            image = Image.open(opener)
            image.load()
            image = ImageOps.exif_transpose(image)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{where}: {what} is not a readable image ({e}); fix: re-encode it as PNG or JPEG, "
                            "or drop the row") from e
    return to_rgb(image)


def to_rgb(image):
    """RGB, with any transparency composited onto white (as transformers' processors do)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def pan_and_scan_crops(image, cfg: ImageConfig) -> list:
    """The crops of one image (PIL), row-major, or [] when Pan & Scan does not apply to it."""
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long / short < cfg.pan_and_scan_min_ratio_to_activate:
        return []
    n = int(math.floor(long / short + 0.5))  # crops along the long side, half rounded up
    n = min(int(math.floor(long / cfg.pan_and_scan_min_crop_size)), n)
    n = min(cfg.pan_and_scan_max_num_crops, max(2, n))
    cols, rows = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = math.ceil(width / cols), math.ceil(height / rows)
    if min(crop_w, crop_h) < cfg.pan_and_scan_min_crop_size:
        return []
    # the last crop may run past the edge; like array slicing, it is cut at the image's border
    return [image.crop((x, y, min(x + crop_w, width), min(y + crop_h, height)))
            for y in range(0, rows * crop_h, crop_h) for x in range(0, cols * crop_w, crop_w)]


def pixel_values(image, cfg: ImageConfig) -> torch.Tensor:
    """One RGB PIL image -> (3, size, size) float32: bilinear resize, rescale, normalise."""
    from PIL import Image

    resized = np.asarray(image.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR), dtype=np.uint8)
    x = (resized.astype(np.float64) * cfg.rescale).astype(np.float32)  # rounded once, from float64
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(images: Sequence, cfg: ImageConfig) -> tuple[torch.Tensor, list[int]]:
    """PIL images (any mode; made RGB by to_rgb) -> pixel values (N, 3, size, size), each image followed
    by its Pan & Scan crops, and the crop count of each image (0 without Pan & Scan)."""
    out, crops = [], []
    for image in map(to_rgb, images):
        extra = pan_and_scan_crops(image, cfg) if cfg.pan_and_scan else []
        out += [pixel_values(im, cfg) for im in [image, *extra]]
        crops.append(len(extra))
    empty = torch.empty(0, 3, cfg.size, cfg.size)
    return (torch.stack(out) if out else empty), crops


# ----------------------------------------------------------------------------- chat rows with images

class ImageChat(NamedTuple):
    """A tokenized conversation with its images."""

    ids: list[int]
    loss_mask: list[bool]  # False on every image, <start_of_image> and <end_of_image> token
    token_type_ids: list[int]  # 1 at image tokens, 0 elsewhere (transformers' meaning)
    pixel_values: torch.Tensor  # (N, 3, size, size): the images and their crops, in the order of their blocks
    num_crops: list[int]


def image_parts(messages: Sequence[dict]) -> list[tuple[int, str]]:
    """(message index, role) of every {"type": "image"} part, in order."""
    return [(i, m.get("role")) for i, m in enumerate(messages) if isinstance(m, dict)
            and isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]


def row_images(row: dict, where: str) -> list:
    """The RGB images of a data row (TRL's vision format: an `images` list or one `image`), checked against
    its messages' image parts: one image per part, all in user turns."""
    given = row.get("images")
    if given is None and row.get("image") is not None:
        given = [row["image"]]
    given = [] if given is None else given
    if not isinstance(given, (list, tuple)):
        raise UserError(f"{where}: 'images' must be a list of images (paths, bytes or PIL images), "
                        f"got {type(given).__name__}")
    parts = image_parts(row.get("messages") or [])
    for i, role in parts:
        if role == "system":
            raise UserError(f"{where}: messages[{i}] is a system message with an image part; the Gemma 3 template "
                            "keeps only a system message's text (fix: move the image into the first user message)")
        if role in ("assistant", "model"):
            raise UserError(f"{where}: messages[{i}] is an assistant turn with an image part; images belong in "
                            "user turns (fix: move the image into the user message)")
    if len(parts) != len(given):
        more = "image parts than images" if len(parts) > len(given) else "images than image parts"
        raise UserError(f"{where}: {len(parts)} image parts and {len(given)} images: more {more} (fix: one "
                        '{"type": "image"} part per entry of the images column, in order)')
    return [load_image(src, f"{where} images[{k}]") for k, src in enumerate(given)]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], images: Sequence, cfg: ImageConfig,
                add_generation_prompt: bool = False) -> ImageChat:
    """A conversation with images as the model reads it: transformers' Gemma3Processor's ids (each image
    part expanded to its block of soft tokens, crops included) and our loss mask."""
    pixels, crops = preprocess(images, cfg)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt, image_crops=crops,
                                        tokens_per_image=cfg.tokens_per_image)
    no_loss = {IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID}
    mask = [m and t not in no_loss for t, m in zip(enc.ids, enc.loss_mask)]
    types = [int(t == IMAGE_TOKEN_ID) for t in enc.ids]
    return ImageChat(list(enc.ids), mask, types, pixels, crops)


__all__ = ["ImageChat", "ImageConfig", "encode_chat", "image_config", "image_parts", "load_image", "pan_and_scan_crops",
           "pixel_values", "preprocess", "row_images"]
