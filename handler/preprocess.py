"""Image decoding and preprocessing, shared by the server, training and calibration.

One path from bytes to model input: ``decode_image`` (bytes -> PIL image, validated) and
``crop_image`` (PIL image -> uint8 HxWxC array at the model's input size), then ``to_batch``
(list of uint8 arrays -> normalized float tensor in channels_last, one fused op per batch).
"""
from __future__ import annotations

import ctypes
import io
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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
    def from_dict(cls, d: dict) -> Preprocessing:
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
    """Decode (if needed), resize the shorter side and centre-crop, convert, to a uint8 array.

    Returns (crop, crop) for "L" or (crop, crop, 3) for "RGB". For JPEG, ``draft`` lets libjpeg
    decode at a reduced scale (1/2, 1/4, 1/8) that still covers the resize target, which skips
    most of the IDCT work before the resize.

    Memory: the full-size pixels are decoded once and copied at full size at most once (see
    ``_resizable``). The EXIF turn is applied to the (crop, crop) result, not to the whole image:
    the centre box is a square about the centre, the same region before and after a turn, so only
    rounding differs (at most 1 of 255: Pillow rounds between its row and column passes).
    """
    try:
        if draft and img.format == "JPEG":
            img.draft(spec.color_mode, (spec.resize, spec.resize))
        turn = _EXIF_TRANSPOSE.get(img.getexif().get(_ORIENTATION, 1))  # JPEG: read from the header
        src, box = _resizable(img, spec)  # decodes
        small = src.resize((spec.crop, spec.crop), _RESAMPLE[spec.interpolation], box=box)
        del src  # a conversion, if one was needed, goes now
        if turn is not None:
            small = small.transpose(turn)
        return np.asarray(_to_mode(small, spec.color_mode), dtype=np.uint8)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"image data is corrupt or truncated: {exc}", reason="decode") from None


def pixels_to_decode(img: Image.Image, spec: Preprocessing, *, draft: bool = True) -> int:
    """How many pixels ``crop_image`` will decode for an opened image (``decode_image``): the
    whole image, or for a JPEG with ``draft`` the reduced scale libjpeg decodes at (Pillow's
    draft: the largest of 1/8, 1/4, 1/2 that still covers (resize, resize))."""
    w, h = img.size
    if draft and img.format == "JPEG":
        fit = min(w // spec.resize, h // spec.resize)
        scale = next(s for s in (8, 4, 2, 1) if fit >= s or s == 1)
        return -(-w // scale) * -(-h // scale)
    return w * h


class BatchDecoder:
    """A batch's opened images (``decode_image``) to crops (``crop_image``), on ``threads`` threads.

    Images of at most ``PARALLEL_PIXELS`` to decode (``pixels_to_decode``: a 224-pixel JPEG is
    50,176; a 12 MP photo with JPEG draft 187,500) are decoded ``threads`` at a time where together
    they have ``PARALLEL_MIN_PIXELS`` (Pillow lets go of the GIL while it decodes and resamples),
    the calling thread taking a share; the larger ones afterwards in the calling thread, one at a
    time: at most ``threads`` small images' pixels at once, never a large one beside another. Each
    image is closed once cropped, so its pixels go at once.
    """

    # 4 MiB of pixels each at most, in Pillow's 4 bytes a pixel; only where they add up to two
    # 224-pixel images: below it the hand-off costs more than it saves (AMD EPYC, batch 8: 28x28
    # PNGs 8.5 ms a batch on one thread, 8.9 on two).
    PARALLEL_PIXELS = 2**20
    PARALLEL_MIN_PIXELS = 100_000

    def __init__(self, spec: Preprocessing, *, draft: bool = True, threads: int = 1) -> None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"decode_threads must be an integer >= 1, got {threads!r}")
        self.spec, self.draft, self.threads = spec, draft, threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="mrl-decode") if threads > 1 else None

    def __call__(self, images: list[Image.Image]) -> list[tuple[np.ndarray | None, int, Exception | None]]:
        """Per image, in order: (its crop, its decoded bytes, the exception that failed it)."""
        small, pixels = [], 0
        for k, img in enumerate(images):
            n = pixels_to_decode(img, self.spec, draft=self.draft)
            if n <= self.PARALLEL_PIXELS:
                small.append(k)
                pixels += n
        results: list = [None] * len(images)

        def run(share: list[int]) -> None:
            for k in share:
                results[k] = self._one(images[k])

        if self._pool is not None and len(small) > 1 and pixels >= self.PARALLEL_MIN_PIXELS:
            shares = [small[t::self.threads] for t in range(self.threads)]  # one hand-off per thread
            others = [self._pool.submit(run, share) for share in shares[1:] if share]
            run(shares[0])
            for f in others:
                f.result()
        run([k for k in range(len(images)) if results[k] is None])
        return results

    def _one(self, img: Image.Image) -> tuple[np.ndarray | None, int, Exception | None]:
        crop, failed = None, None
        try:
            crop = crop_image(img, self.spec, draft=self.draft)
        except Exception as exc:  # InputError: the client's; others: ours, logged by the caller
            failed = exc
        size = decoded_bytes(img)
        img.close()
        return crop, size, failed


def decoded_bytes(img: Image.Image) -> int:
    """About how many bytes an image's decoded pixels take (after any JPEG draft): Pillow keeps
    1 byte a pixel for "1", "L" and "P", 2 for 16-bit and 4 for the rest (RGB included)."""
    per_pixel = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    return img.width * img.height * per_pixel


def release_freed_memory() -> bool:
    """Hand the process's freed heap memory back to the OS (glibc ``malloc_trim``).

    The server's malloc settings (``SERVER_ENV`` in model_store/serve.py) keep freed memory in
    the process so that the forward pass does not page-fault its activations afresh each batch;
    a large image's one-off pixel buffers would then stay resident for the worker's lifetime.
    Call this after such an image is gone (``decoded_bytes`` above ``RELEASE_BYTES``); the next
    forward pass page-faults its activations once. False where the C library has no malloc_trim.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc: nothing to call
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim = None
# Decoded pixels above this many bytes (a 3000x3000 RGB PNG; JPEGs are decoded at a reduced scale)
# are handed back to the OS once the image is gone: below it, what the heap keeps is bounded by it.
RELEASE_BYTES = 32 * 2**20
_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I")  # grayscale that Pillow may also call "I"
_STRIP_ROWS = 256  # rows composited onto white at a time: small temporaries whatever the width


def _resizable(img: Image.Image, spec: Preprocessing) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The decoded image in a mode to resample in, and the centre box to resample, copying as
    little as gives the same pixels.

    16-bit stays 16-bit (scaled to 8 bits after the resize, on the crop: no float64 copy of the
    whole image); grayscale for an RGB model is resampled as one channel and replicated after (the
    same pixels). Transparency is composited onto white, and other modes converted as they always
    were, but only over the pixels that the resize reads (the box and its filter's reach), and
    for transparency strip by strip: the same pixels as converting the whole image first.
    """
    img.load()
    mode = spec.color_mode
    box = _center_crop_box(img.size, spec.resize, spec.crop)
    alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if not alpha and (img.mode in _SIXTEEN_BIT or img.mode == mode or (img.mode == "L" and mode == "RGB")):
        return img, box
    left, top, right, bottom = _filter_reach(img.size, box, spec)
    box = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    if alpha:
        return _onto_white(img, mode, (left, top, right, bottom)), box
    return img.crop((left, top, right, bottom)).convert(mode), box


def _filter_reach(size: tuple[int, int], box, spec: Preprocessing) -> tuple[int, int, int, int]:
    """The pixels that resizing ``box`` to (crop, crop) reads: the box widened by the filter's
    support (1 for bilinear, 2 for bicubic, times the downscale) and 2 pixels more."""
    scale = (box[2] - box[0]) / spec.crop
    margin = math.ceil((2.0 if spec.interpolation == "bicubic" else 1.0) * max(scale, 1.0)) + 2
    return (max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin),
            min(size[0], math.ceil(box[2]) + margin), min(size[1], math.ceil(box[3]) + margin))


def _onto_white(img: Image.Image, mode: str, region: tuple[int, int, int, int]) -> Image.Image:
    """``region`` of ``img`` composited onto white, as a viewer would show it, in ``mode``: the
    same pixels as compositing the whole image at once, without full-size RGBA copies."""
    left, top, right, bottom = region
    out = Image.new(mode, (right - left, bottom - top))
    background = None
    for y in range(top, bottom, _STRIP_ROWS):
        strip = img.crop((left, y, right, min(y + _STRIP_ROWS, bottom))).convert("RGBA")
        if background is None or background.size != strip.size:
            background = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(background, strip).convert(mode), (0, y - top))
    return out


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """A (crop, crop) image to ``mode``: 16 bits to 8 (v / 257, rounded), grayscale to RGB."""
    if img.mode == mode:
        return img
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)  # (crop, crop): small
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
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
