"""A corpus of bad and unusual requests, made in code, for the unit and integration tests.

Each ``Case`` holds a request item as TorchServe hands it to the handler (``item``), its HTTP
headers, the status the server must answer and, for refusals, a piece of the message and the
``reason`` label it is counted under in ``mrl_request_errors_total``. ``Case.to_http()`` gives the
same request as bytes and headers for an HTTP client, so the integration tests send this corpus
to a real TorchServe.

Images are small (tens of pixels) and built from numpy arrays with Pillow; hand-made headers carry
valid CRCs, so what a case exercises is the documented defect and nothing else. Where an outcome
depends on Pillow (which truncations still decode), the expectation was checked against Pillow 13
and is explained next to the case.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Fields whose bytes travel as a multipart file part over HTTP (the rest are form fields).
_FILE_FIELDS = ("data", "file", "image")
_BOUNDARY = "mrl-corpus-boundary-7d2f"
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    """One request and what the server must answer to it."""

    name: str
    item: dict
    headers: dict
    expect: int | tuple[int, ...]
    message_contains: str | None = None
    reason: str | None = None  # mrl_request_errors_total label of a refusal; None for 200
    http: tuple[bytes, dict] | None = field(default=None, compare=False)  # when HTTP differs from item

    def __post_init__(self) -> None:
        statuses = self.statuses
        if (200 in statuses) != (self.reason is None):
            raise ValueError(f"case {self.name!r}: a reason is needed exactly when a refusal is expected")

    @property
    def statuses(self) -> tuple[int, ...]:
        return self.expect if isinstance(self.expect, tuple) else (self.expect,)

    @property
    def ok(self) -> bool:
        return self.statuses == (200,)

    def to_http(self) -> tuple[bytes, dict[str, str]]:
        """The same request for an HTTP client: (body, headers).

        A bytes body goes as application/octet-stream unless the case sets a Content-Type; a str
        body (what TorchServe makes of a text/* body) as text/plain; any other body (JSON that
        TorchServe already parsed) as application/json; named fields as multipart/form-data, with
        image fields as file parts.
        """
        if self.http is not None:
            return self.http
        headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in self.headers.items()}
        has_type = any(k.lower() == "content-type" for k in headers)
        if set(self.item) == {"body"}:
            body = self.item["body"]
            if isinstance(body, (bytes, bytearray)):
                if not has_type:
                    headers["Content-Type"] = "application/octet-stream"
                return bytes(body), headers
            if isinstance(body, str):
                return body.encode("utf-8"), {"Content-Type": "text/plain; charset=utf-8", **headers}
            return json.dumps(body).encode("utf-8"), {"Content-Type": "application/json", **headers}
        body, content_type = multipart(self.item)
        return body, {**headers, "Content-Type": content_type}


def multipart(fields: dict) -> tuple[bytes, str]:
    """Encode fields as multipart/form-data: bytes under an image field name become file parts."""
    parts = []
    for name, value in fields.items():
        if name in _FILE_FIELDS and isinstance(value, (bytes, bytearray)):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            data = bytes(value)
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(f"--{_BOUNDARY}\r\n{head}".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={_BOUNDARY}"


# ---- images -------------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """An RGB gradient with mild noise: compresses well, and differs across rows and columns."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + 2 * yy) % 256], axis=-1)
    return Image.fromarray(np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, *, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG with a valid signature, IHDR (with CRC) and IEND but no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = value
    return exif.tobytes()


def animated_gif() -> bytes:
    """Three different frames; the server classifies the first."""
    frames = [gradient(seed=0), gradient(seed=1).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
              Image.new("RGB", (40, 30), (250, 20, 20))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


@functools.cache
def images() -> dict[str, bytes]:
    """Every encoded image the corpus uses, by name (built once per process)."""
    rgb = gradient()
    sixteen = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 53).astype(np.uint16)
    rgba = np.dstack([np.asarray(rgb), np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1))])
    return {
        "png": encode(rgb, "PNG"),
        "jpeg": encode(rgb, "JPEG", quality=90),
        "png_gray": encode(rgb.convert("L"), "PNG"),
        "png_1x1": encode(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG"),
        "png_16bit": encode(Image.fromarray(sixteen), "PNG"),  # opens as mode I;16
        "png_1bit": encode(rgb.convert("1"), "PNG"),
        "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "png_palette_transparency": encode(rgb.quantize(16), "PNG", transparency=0),
        "gif_animated": animated_gif(),
        "jpeg_exif_rotated": encode(rgb, "JPEG", quality=90, exif=exif_orientation(6)),
        "png_rgba": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "png_la": encode(Image.fromarray(rgba, "RGBA").convert("LA"), "PNG"),
        "webp": encode(rgb, "WEBP", quality=80),
        "webp_lossless_rgba": encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True),
        "bmp": encode(rgb, "BMP"),
        "png_wide_1px": encode(Image.new("L", (2000, 1), 128), "PNG"),
        "tiff": encode(rgb, "TIFF"),
    }


# ---- the corpus ---------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def cases() -> list[Case]:
    """The whole corpus, in a stable order; names are unique."""
    img = images()
    png, jpeg = img["png"], img["jpeg"]
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'
    form = b"data=aGVsbG8%3D&top_k=3"

    def ok(name: str, data: bytes, **headers: str) -> Case:
        return Case(name, {"body": data}, dict(headers), 200)

    def refused(name, item, expect, message, reason, headers=None, **kw) -> Case:
        return Case(name, item, dict(headers or {}), expect, message, reason, **kw)

    def raw(body: bytes | str) -> dict:
        return {"body": body}

    out = [
        # -- unusual but valid images: classified
        ok("png_rgb", png),
        ok("jpeg_rgb", jpeg),
        ok("png_gray", img["png_gray"]),
        ok("png_1x1", img["png_1x1"]),  # Pillow cannot encode a 0x0 image; the 0x0 header is below
        ok("png_16bit_gray", img["png_16bit"]),
        ok("png_1bit", img["png_1bit"]),
        ok("jpeg_cmyk", img["jpeg_cmyk"]),
        ok("png_palette_transparency", img["png_palette_transparency"]),
        ok("gif_animated", img["gif_animated"]),
        ok("jpeg_exif_orientation_6", img["jpeg_exif_rotated"]),
        ok("png_rgba", img["png_rgba"]),
        ok("png_la", img["png_la"]),
        ok("webp_lossy", img["webp"]),
        ok("webp_lossless_rgba", img["webp_lossless_rgba"]),
        ok("bmp", img["bmp"]),
        ok("png_2000x1", img["png_wide_1px"]),
        # Losing the last 20 bytes removes IEND, the IDAT CRC and the zlib Adler-32, but every
        # pixel is there, and Pillow decodes it (it verifies neither checksum).
        ok("png_truncated_minus_20", png[:-20]),
        ok("png_image_content_type", png, **{"Content-Type": "image/png"}),
        Case("json_base64_png", {"body": {"data": _b64(png), "top_k": 3}}, {}, 200),
        Case("multipart_png_top_k", {"data": png, "top_k": b"3"}, {}, 200),
        Case("header_options", {"body": jpeg}, {"X-MRL-Dim": "16", "X-MRL-Return-Embedding": "true"}, 200),

        # -- no image, or no image we read
        refused("empty_body", raw(b""), 400, "the request has no image", "empty"),
        refused("no_image_field", {"top_k": b"3"}, 400, "the request has no image", "empty"),
        refused("plain_text", raw("hello, this is not an image\n"), 400, "cannot identify an image", "decode"),
        refused("svg_xml", raw(svg), 400, "accepted formats: JPEG, PNG, WEBP, BMP, GIF", "decode",
                {"Content-Type": "image/svg+xml"}),
        refused("tiff_not_accepted", raw(img["tiff"]), 400, "accepted formats", "decode"),
        refused("wrong_magic", raw(b"\x00\x00" + jpeg[2:]), 400, "cannot identify an image", "decode"),
        refused("png_signature_then_garbage", raw(png[:8] + bytes(range(256)) * 4), 400,
                "cannot identify an image", "decode"),
        # Pillow refuses a 0x0 IHDR when it opens the file, before our own zero-size check.
        refused("png_zero_size_header", raw(png_header_only(0, 0)), 400, "cannot identify an image", "decode"),
        refused("png_header_without_pixels", raw(png_header_only(4, 4)), 400, "corrupt or truncated", "decode"),
        # Truncations: at 10 bytes the header is incomplete; later, the pixel data is.
        refused("jpeg_truncated_10", raw(jpeg[:10]), 400, "while reading the image header", "decode"),
        # Half of this small JPEG is still its tables; the middle of the scan data is a separate case.
        refused("jpeg_truncated_half", raw(jpeg[: len(jpeg) // 2]), 400, "while reading the image header",
                "decode"),
        refused("jpeg_truncated_mid_scan", raw(jpeg[: (jpeg.index(b"\xff\xda") + len(jpeg)) // 2]), 400,
                "corrupt or truncated", "decode"),
        # libjpeg still needs the lost end of the entropy-coded data; Pillow, with
        # LOAD_TRUNCATED_IMAGES off (as it should stay), refuses rather than pad the image with grey.
        refused("jpeg_truncated_minus_20", raw(jpeg[:-20]), 400, "corrupt or truncated", "decode"),
        refused("png_truncated_10", raw(png[:10]), 400, "cannot identify an image", "decode"),
        refused("png_truncated_half", raw(png[: len(png) // 2]), 400, "corrupt or truncated", "decode"),
        # Sizes: above Pillow's MAX_IMAGE_PIXELS (about 89 megapixels) its bomb check refuses at open;
        # from our MAX_PIXELS (40 megapixels) up to there, our own check does.
        refused("png_header_60000x60000", raw(png_header_only(60000, 60000)), 413,
                "too large to decode safely", "too_large"),
        refused("png_header_7000x7000", raw(png_header_only(7000, 7000)), 413,
                "7000x7000 = 49000000 pixels; the limit is 40000000", "too_large"),

        # -- JSON bodies
        refused("json_invalid_base64", {"body": {"data": "iVBORw0KGgo*not-base64*"}}, 400,
                "not valid base64", "decode"),
        refused("json_malformed_bytes", raw(b'{"data": "iVBORw0KGgo'), 400, "body is not valid JSON",
                "bad_request", {"Content-Type": "application/json"}),
        refused("json_not_utf8", raw(b'{"data": "\xff\xfe"}'), 400, "body is not valid JSON", "bad_request",
                {"Content-Type": "application/json"}),
        refused("json_array_bytes", raw(b"[1, 2, 3]"), 400, "must be an object", "bad_request"),
        refused("json_without_data", {"body": {"image": _b64(png)}}, 400, "needs a 'data' field", "bad_request"),
        refused("json_data_not_a_string", {"body": {"data": 12345}}, 400, "must be a base64 string, got int",
                "bad_request"),
        refused("json_data_empty_string", {"body": {"data": ""}}, 400, "the request has no image", "empty"),
        # TorchServe parses an application/json body before the handler sees it; what it hands
        # over need not be an object.
        refused("json_body_null", {"body": None}, 400, "JSON", "bad_request"),
        refused("json_body_list_of_strings", {"body": ["iVBORw0KGgo="]}, 400, "JSON", "bad_request"),
        refused("json_body_negative_number", {"body": -1}, 400, "JSON", "bad_request"),
        refused("json_body_huge_number", {"body": 10**11}, 400, "JSON", "bad_request"),
        # TorchServe's own json.loads fails on these, so it forwards the raw bytes.
        refused("json_nested_100000_deep", raw(b"[" * 100_000), 400, "JSON", "bad_request",
                {"Content-Type": "application/json"}),
        refused("json_integer_5000_digits", raw(b'{"data": "", "top_k": 1' + b"0" * 5000 + b"}"), 400, "JSON",
                "bad_request", {"Content-Type": "application/json"}),

        # -- options, through each channel: JSON fields, multipart fields, X-MRL-* headers
        refused("unknown_option_json", {"body": {"data": _b64(png), "foo": 1}}, 400, "unknown option 'foo'",
                "bad_option"),
        refused("unknown_option_header", raw(png), 400, "unknown option 'colour'", "bad_option",
                {"X-MRL-Colour": "red"}),
        refused("unknown_operating_point", {"data": png, "operating_point": b"turbo"}, 400,
                "operating_point='turbo' is unknown; allowed: balanced, exact", "bad_option"),
        refused("dim_12_not_nesting", raw(png), 400, "dim=12 is not a nesting size", "bad_option",
                {"X-MRL-Dim": "12"}),
        refused("dim_not_integer", {"body": {"data": _b64(png), "dim": "abc"}}, 400, "dim='abc' is not an integer",
                "bad_option"),
        refused("dim_and_operating_point", {"data": png, "dim": b"64", "operating_point": b"exact"}, 400,
                "not both", "bad_option"),
        refused("top_k_0", {"data": png, "top_k": b"0"}, 400, "top_k=0 is out of range; allowed: 1 to 10",
                "bad_option"),
        refused("top_k_negative", raw(png), 400, "top_k=-1 is out of range", "bad_option", {"X-MRL-Top-K": "-1"}),
        refused("top_k_1000000", {"body": {"data": _b64(png), "top_k": 1000000}}, 400,
                "top_k=1000000 is out of range", "bad_option"),
        refused("top_k_fraction", {"body": {"data": _b64(png), "top_k": 2.5}}, 400,
                "top_k='2.5' is not an integer", "bad_option"),
        refused("return_embedding_maybe", raw(png), 400, "return_embedding='maybe' is not a boolean", "bad_option",
                {"X-MRL-Return-Embedding": "maybe"}),
        refused("option_value_a_list", {"body": {"data": _b64(png), "top_k": [3]}}, 400,
                "must be a string, number or boolean", "bad_option"),
        refused("option_twice_header_and_field", {"data": png, "top_k": b"3"}, 400,
                "option 'top_k' is given twice", "bad_option", {"X-MRL-Top-K": "3"}),
        refused("option_twice_header_and_json", {"body": {"data": _b64(png), "dim": 16}}, 400,
                "option 'dim' is given twice", "bad_option", {"X-MRL-Dim": "16"}),
        # Two spellings of one header (HTTP header names are case-insensitive; '_' and '-' both map).
        refused("option_twice_in_headers", raw(png), 400, "option 'top_k' is given twice", "bad_option",
                {"X-MRL-Top-K": "3", "X-MRL-Top_K": "7"}),
        refused("option_value_65_chars", raw(png), 400, "65 characters long", "bad_option",
                {"X-MRL-Operating-Point": "b" * 65}),

        # -- request shape
        refused("form_urlencoded", {"data": "aGVsbG8=", "top_k": "3"}, 415, "URL-encoded form", "bad_request",
                {"Content-Type": "application/x-www-form-urlencoded"},
                http=(form, {"Content-Type": "application/x-www-form-urlencoded"})),
        refused("two_images_multipart", {"data": png, "file": jpeg}, 400, "more than one image", "bad_request"),
    ]
    names = [c.name for c in out]
    if len(names) != len(set(names)):
        raise ValueError(f"duplicate case names: {sorted(n for n in names if names.count(n) > 1)}")
    return out
