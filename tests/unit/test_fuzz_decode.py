"""Fuzzing the decode path: whatever the bytes, a crop of the right shape comes back or InputError.

Inputs are valid small images in every accepted format (and a few colour modes, EXIF, animation)
mutated by flipping, setting, inserting, deleting and splicing bytes and by truncation, plus random
bytes with and without a format's magic number. Each input goes through ``decode_image`` and
``crop_image`` with the demo preprocessing and with the ImageNet one.

CI runs a fixed set of 300 examples (derandomized, a few seconds). For a longer, random search:

    MRL_FUZZ_EXAMPLES=20000 pytest tests/unit/test_fuzz_decode.py

The process's address space is capped while these tests run, so an input that makes preprocessing
allocate gigabytes fails here with MemoryError instead of taking the machine down.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from handler.checkpoint import IMAGENET_PREPROCESSING
from handler.errors import InputError
from handler.preprocess import Preprocessing, crop_image, decode_image
from tests.corpus import encode, exif_orientation, gradient
from training.train_mrl import demo_preprocessing

resource = pytest.importorskip("resource")  # the address-space cap needs a POSIX system

SPECS = {"demo": demo_preprocessing(32), "imagenet": IMAGENET_PREPROCESSING}
EXAMPLES = int(os.environ.get("MRL_FUZZ_EXAMPLES", 300))
RANDOM_SEARCH = "MRL_FUZZ_EXAMPLES" in os.environ  # a person asked for a long run: explore anew
HEADROOM_BYTES = 1536 * 2**20  # above what the test process already maps
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ")


def seed_images() -> dict[str, bytes]:
    """Small valid encodings: every accepted format, plus the modes and metadata that take other paths."""
    rgb = gradient(16, 12)
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize((16, 12)))
    sixteen = Image.fromarray((np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 331).astype(np.uint16))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    return {
        "png": encode(rgb, "PNG"),
        "png_exif": encode(rgb, "PNG", exif=exif_orientation(8)),
        "png_16bit": encode(sixteen, "PNG"),
        "png_palette_transparency": encode(rgb.quantize(8), "PNG", transparency=0),
        "png_la": encode(rgba.convert("LA"), "PNG"),
        "jpeg_exif": encode(rgb, "JPEG", quality=85, exif=exif_orientation(6)),
        "jpeg_progressive_gray": encode(rgb.convert("L"), "JPEG", progressive=True),
        "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "gif_animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "bmp": encode(rgb, "BMP"),
        "bmp_palette": encode(rgb.quantize(16), "BMP"),
        "webp": encode(rgb, "WEBP", quality=70),
        "webp_lossless_rgba_exif": encode(rgba, "WEBP", lossless=True, exif=exif_orientation(3)),
    }


SEEDS = seed_images()
SEED_NAMES = sorted(SEEDS)


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "splice", "truncate")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "splice":
            donor = SEEDS[draw(st.sampled_from(SEED_NAMES))]
            start = draw(st.integers(0, len(donor) - 1))
            data[at:at + draw(st.integers(0, 32))] = donor[start:start + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


# Half mutated images, half random bytes (with or without a format's magic number in front).
ANY_BYTES = st.one_of(
    mutated_images(),
    st.one_of(st.binary(max_size=256),
              st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC), st.binary(max_size=256))),
)


@pytest.fixture(scope="module")
def memory_cap():
    """Cap the address space for this module's tests; the previous limit comes back afterwards."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm to size the address-space cap")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + HEADROOM_BYTES
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield cap
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def expected_shape(spec: Preprocessing) -> tuple[int, ...]:
    return (spec.crop, spec.crop) if spec.color_mode == "L" else (spec.crop, spec.crop, 3)


def crop_or_refuse(data: bytes, spec: Preprocessing) -> str:
    """The property: a uint8 crop of the model's input shape, or InputError; nothing else."""
    try:
        crop = crop_image(decode_image(data), spec)
    except InputError as exc:
        return f"refused: {exc.reason}"
    assert isinstance(crop, np.ndarray) and crop.dtype == np.uint8
    assert crop.shape == expected_shape(spec)
    return "cropped"


def test_seeds_are_valid_images(memory_cap):
    for name, data in SEEDS.items():
        for spec in SPECS.values():
            assert crop_image(decode_image(data), spec).shape == expected_shape(spec), name


# Fuzzed files carry corrupt metadata on purpose; Pillow warns about it and then carries on.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM_SEARCH, database=None,
          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=ANY_BYTES)
def test_any_bytes_give_a_crop_or_input_error(memory_cap, data):
    for spec in SPECS.values():
        event(crop_or_refuse(data, spec))  # --hypothesis-show-statistics shows the mix


@pytest.mark.parametrize("size", [(16000, 1), (1, 16000)], ids=["16000x1", "1x16000"])
def test_extreme_aspect_ratio_gives_a_crop_or_input_error(memory_cap, size):
    """A 16000x1 PNG is about 130 bytes and 16,000 pixels, far below MAX_PIXELS."""
    data = encode(Image.new("RGB", size, (10, 200, 30)), "PNG")
    assert len(data) < 200
    for spec in SPECS.values():
        crop_or_refuse(data, spec)
