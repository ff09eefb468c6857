"""Image decoding and preprocessing, shared by the server, training and calibration.

One path from bytes to model input: ``decode_image`` (bytes -> PIL image, validated) and
``crop_image`` (PIL image -> uint8 HxWxC array at the model's input size), then ``to_batch``
(list of uint8 arrays -> normalized float tensor in channels_last, one fused op per batch).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from handler.errors import InputError

# Pillow's own decompression-bomb guard stays on; we refuse anything above this many pixels
# (about 40 megapixels, e.g. 8000x5000) before decoding the pixel data.
MAX_PIXELS = 40_000_000
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: colour mode, resize of the shorter side, centre crop, mean/std."""

    color_mode: str  # "L" (grayscale, replicated to 3 channels) or "RGB"
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.color_mode not in ("L", "RGB"):
            raise ValueError(f"color_mode must be 'L' or 'RGB', got {self.color_mode!r}")
        if not 8 <= self.crop <= self.resize <= 1024:
            raise ValueError(f"need 8 <= crop <= resize <= 1024, got crop={self.crop} resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(color_mode=d["color_mode"], resize=int(d["resize"]), crop=int(d["crop"]),
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                   interpolation=d.get("interpolation", "bilinear"))

    def to_dict(self) -> dict:
        return {"color_mode": self.color_mode, "resize": self.resize, "crop": self.crop,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an encoded image, check its format and size, and return it with EXIF rotation applied.

    The pixel data is not decoded yet (``crop_image`` decodes, with JPEG DCT scaling).
    Raises ``InputError`` for anything that is not a usable image.
    """
    if not data:
        raise InputError("the request has no image: the body is empty", reason="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
            raise InputError(f"image is too large to decode safely ({exc})", reason="too_large",
                             status=413) from None
        raise InputError(f"cannot identify an image in the {len(data)}-byte body; "
                         f"accepted formats: {', '.join(FORMATS)}", reason="decode") from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise InputError(f"malformed {type(exc).__name__} while reading the image header: {exc}",
                         reason="decode") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"image has zero size ({w}x{h})", reason="decode")
    if w * h > max_pixels:
        raise InputError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
                         reason="too_large", status=413)
    return img


def crop_image(img: Image.Image, spec: Preprocessing, *, draft: bool = True) -> np.ndarray:
    """Decode (if needed), convert, resize the shorter side and centre-crop to a uint8 array.

    Returns (crop, crop) for "L" or (crop, crop, 3) for "RGB". For JPEG, ``draft`` lets libjpeg
    decode at a reduced scale (1/2, 1/4, 1/8) that still covers the resize target, which skips
    most of the IDCT work before the resize.
    """
    try:
        if draft and img.format == "JPEG":
            img.draft(spec.color_mode, (spec.resize, spec.resize))
        img = ImageOps.exif_transpose(img)  # decodes; honours the EXIF orientation tag
        img = _to_mode(img, spec.color_mode)
        img = img.resize((spec.crop, spec.crop), _RESAMPLE[spec.interpolation],
                         box=_center_crop_box(img.size, spec.resize, spec.crop))
        return np.asarray(img, dtype=np.uint8)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"image data is corrupt or truncated: {exc}", reason="decode") from None


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode == mode:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (Pillow may say "I"): to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as a viewer would show it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def _center_crop_box(size: tuple[int, int], resize: int, crop: int) -> tuple[float, float, float, float]:
    """The source region that "resize the shorter side to ``resize``, centre-crop ``crop``" keeps.

    Resampling only this box straight to (crop, crop) gives the same pixels as resizing the whole
    image first, but the work and memory are bounded by the crop, whatever the aspect ratio
    (a 16000x1 image would otherwise be scaled to 4 million x 256 before cropping).
    """
    w, h = size
    side = crop * min(w, h) / resize  # the crop's extent in source pixels
    left, top = (w - side) / 2, (h - side) / 2
    return (left, top, left + side, top + side)


class Normalizer:
    """uint8 crops -> float (B, 3, H, W) tensor in channels_last, normalized, on ``device``."""

    def __init__(self, spec: Preprocessing, device: torch.device | str = "cpu") -> None:
        self.spec, self.device = spec, torch.device(device)
        # x * scale + shift == (x / 255 - mean) / std, folded into one multiply-add.
        std = torch.tensor(spec.std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-torch.tensor(spec.mean) / std).view(1, 3, 1, 1).to(self.device)

    def __call__(self, crops: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(crops) if isinstance(crops, list) else crops))
        if batch.ndim == 3:  # grayscale (B, H, W) -> (B, H, W, 1), broadcast to 3 channels below
            batch = batch.unsqueeze(-1)
        batch = batch.to(self.device, non_blocking=True)
        # (B, H, W, C) uint8 viewed as (B, C, H, W) is already channels_last in memory.
        x = batch.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
        out = torch.empty((x.shape[0], 3, x.shape[2], x.shape[3]), dtype=torch.float32,
                          device=self.device, memory_format=torch.channels_last)
        torch.addcmul(self.shift, x, self.scale, out=out)
        return out
