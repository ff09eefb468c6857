"""han1000: 1000 printed Han characters rendered from Debian's CJK fonts, degraded like a photo or scan.

    han1000:train    training families, 1000 x 300 images (render seeds of the train split)
    han1000:holdout  training families, 1000 x 10, their own render seeds: calibration only
    han1000:test     held-out families never trained on, 1000 x 10: reporting only
    han1000:ood      brush and handwriting families, 1000 x 5: drift experiments only
    han1000:gallery  training families, 1000 x 1000, their own render seeds: retrieval galleries only

The fonts and their split live in ``han_fonts.json`` beside this file (one list: family, Debian
package, split, faces with sha256). Families, not faces, are split: the Noto CJK SC/TC/JP/KR/HK
variants are one family. The classes are the level-1 GB2312 characters in codec order that every
face of the manifest covers (by its cmap), first 1000; the manifest records them, and a font file
whose bytes differ from the manifest's hash is an error naming the file and both hashes.

Image ``i`` of a split is a pure function of (split, i): class ``i % 1000``, family round-robin
over the split's families, then face within the family, and every degradation parameter drawn
from ``numpy.random.default_rng([SPLIT_SEED[split], i])``. Rendered splits are cached as .npy
under ``$MRL_CACHE`` (default ``~/.cache/mrl-serve``), keyed by the manifest and this generator's
version.

    python -m imagedata.glyphs export han1000:test DIR [--limit N]   # one subfolder per character
    python -m imagedata.glyphs manifest                               # rewrite han_fonts.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from handler.checkpoint import file_sha256
from imagedata import CACHE_ROOT

MANIFEST = Path(__file__).with_name("han_fonts.json")
GENERATOR_VERSION = 2  # bump when rendering changes: it keys the cache and the pinned test hashes
NUM_CLASSES = 1000
SIZE = 32             # output side in pixels (the model's input size)
SUPERSAMPLE = 3       # geometry and stroke weight work at SIZE * SUPERSAMPLE, then box-downsample
EM_FRACTION = 0.80    # the font's em square as a fraction of the output side, before scale jitter
SPLIT_SEED = {"train": 1, "holdout": 2, "test": 3, "ood": 4, "gallery": 5}
PER_CLASS = {"train": 300, "holdout": 10, "test": 10, "ood": 5, "gallery": 1000}
FAMILY_SPLIT = {"train": "train", "holdout": "train", "test": "test", "ood": "ood", "gallery": "train"}
CACHE = CACHE_ROOT


class FontMismatch(ValueError):
    """A font file is missing or differs from the manifest."""


@dataclass(frozen=True)
class Face:
    family: str
    file: str
    index: int


@dataclass(frozen=True)
class Degradation:
    """What a camera or scanner does to a printed character; every range is uniform."""

    rotation_deg: float = 15.0            # +-
    scale: tuple[float, float] = (0.80, 1.20)
    aspect: tuple[float, float] = (0.90, 1.10)
    shift_px: float = 2.5                 # +- in output pixels, each axis
    stroke: tuple[int, ...] = (-3, 0, 0, 3, 5)  # MinFilter(3) thins, MaxFilter(k) thickens, 0 keeps
    blur_px: tuple[float, float] = (0.0, 1.4)   # Gaussian radius at the output size
    paper: tuple[float, float] = (125.0, 255.0)
    ink: tuple[float, float] = (0.0, 110.0)     # paper - ink >= 15 levels: faint, never inverted
    noise_sigma: tuple[float, float] = (0.0, 44.0)  # of 255
    jpeg_p: float = 0.7
    jpeg_quality: tuple[int, int] = (10, 80)


DEGRADATION = Degradation()


@lru_cache(maxsize=1)
def manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def faces(split: str) -> list[list[Face]]:
    """The split's families, each a list of faces, in manifest order."""
    if split not in FAMILY_SPLIT:
        raise ValueError(f"unknown han1000 split {split!r}; use one of {sorted(FAMILY_SPLIT)}")
    return [[Face(fam["family"], f["file"], f["index"]) for f in fam["faces"]]
            for fam in manifest()["families"] if fam["split"] == FAMILY_SPLIT[split]]


def classes() -> list[str]:
    return list(manifest()["classes"])


@lru_cache(maxsize=1)
def verify_fonts() -> None:
    """``check_fonts`` on the manifest, once per process."""
    check_fonts(manifest())


def check_fonts(doc: dict) -> None:
    """Every font file of a manifest exists and has the manifest's sha256 (each face checked)."""
    hashes: dict[str, str] = {}
    for fam in doc["families"]:
        for face in fam["faces"]:
            path, want = face["file"], face["sha256"]
            if path not in hashes:
                if not Path(path).exists():
                    raise FontMismatch(f"font file {path} (family {fam['family']}, Debian package "
                                       f"{fam['package']}) is missing; run the set-up step (make setup)")
                hashes[path] = file_sha256(path)
            if hashes[path] != want:
                raise FontMismatch(f"font file {path} has sha256 {hashes[path]}, but the manifest "
                                   f"({MANIFEST.name}) says {want}: another package version renders "
                                   "other images; reinstall it or rebuild the manifest")


@lru_cache(maxsize=64)
def _font(file: str, index: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(file, size=round(EM_FRACTION * SIZE * SUPERSAMPLE), index=index)


def split_item(split: str, i: int) -> tuple[int, Face]:
    """(class index, face) of image i of a split."""
    fams = faces(split)
    k = i // NUM_CLASSES
    family = fams[k % len(fams)]
    return i % NUM_CLASSES, family[(k // len(fams)) % len(family)]


def render(char: str, face: Face, rng: np.random.Generator, deg: Degradation = DEGRADATION) -> np.ndarray:
    """One degraded rendering of ``char``: uint8 (SIZE, SIZE), dark ink on light paper."""
    font = _font(face.file, face.index)
    big = SIZE * SUPERSAMPLE
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(canvas).text((big, big), char, fill=255, font=font, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"{face.file} (face {face.index}) renders {char!r} as an empty glyph")
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2  # centre on the ink box

    theta = np.deg2rad(rng.uniform(-deg.rotation_deg, deg.rotation_deg))
    s = rng.uniform(*deg.scale)
    ax = rng.uniform(*deg.aspect)
    sx, sy = s * ax, s / ax
    tx, ty = rng.uniform(-deg.shift_px, deg.shift_px, size=2) * SUPERSAMPLE
    # output = centre + t + R S (input - c); PIL wants the inverse map output -> input.
    cos, sin = np.cos(theta), np.sin(theta)
    inv = np.array([[cos / sx, sin / sx], [-sin / sy, cos / sy]])
    ox, oy = big / 2 + tx, big / 2 + ty
    a, b = inv[0]
    d, e = inv[1]
    coeffs = (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)
    glyph = canvas.transform((big, big), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)

    k = int(rng.choice(deg.stroke))
    if k < 0:
        glyph = glyph.filter(ImageFilter.MinFilter(-k))
    elif k > 0:
        glyph = glyph.filter(ImageFilter.MaxFilter(k))
    coverage = glyph.reduce(SUPERSAMPLE)  # box filter: anti-aliased coverage at SIZE
    radius = rng.uniform(*deg.blur_px)
    if radius > 0.05:
        coverage = coverage.filter(ImageFilter.GaussianBlur(radius))

    paper, ink = rng.uniform(*deg.paper), rng.uniform(*deg.ink)
    img = paper - (paper - ink) * (np.asarray(coverage, dtype=np.float32) / 255.0)
    img += rng.normal(0.0, rng.uniform(*deg.noise_sigma), size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if rng.random() < deg.jpeg_p:
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, "JPEG", quality=int(rng.integers(*deg.jpeg_quality)))
        img = np.asarray(Image.open(buf), dtype=np.uint8)
    return img


def render_item(split: str, i: int) -> tuple[np.ndarray, int]:
    """Image i of a split, as (uint8 (SIZE, SIZE), label): a pure function of (split, i)."""
    label, face = split_item(split, i)
    rng = np.random.default_rng([SPLIT_SEED[split], i])
    return render(classes()[label], face, rng), label


def _render_range(args: tuple[str, int, int]) -> np.ndarray:
    split, lo, hi = args
    return np.stack([render_item(split, i)[0] for i in range(lo, hi)])


def split_size(split: str) -> int:
    if split not in PER_CLASS:
        raise ValueError(f"unknown han1000 split {split!r}; use one of {sorted(PER_CLASS)}")
    return NUM_CLASSES * PER_CLASS[split]


def cache_key(split: str, n: int) -> str:
    blob = json.dumps([GENERATOR_VERSION, manifest(), split, n, SIZE, SUPERSAMPLE, EM_FRACTION,
                       DEGRADATION.__dict__, Image.__version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render_split(split: str, n: int | None = None, workers: int | None = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, SIZE, SIZE), labels int64 (n,)) for the first n images of a split, cached."""
    total = split_size(split)
    n = total if n is None else min(n, total)
    verify_fonts()
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    path = CACHE / "han1000" / f"{split}-{n}-{cache_key(split, n)}.npy"
    if path.exists():
        return np.load(path), labels
    workers = workers or os.cpu_count() or 1
    chunk = 2000
    jobs = [(split, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    parts: list[np.ndarray] = []
    from tqdm import tqdm
    with ProcessPoolExecutor(workers) as pool:
        for part in tqdm(pool.map(_render_range, jobs), total=len(jobs), unit="chunk",
                         desc=f"rendering han1000:{split} ({n} images)", disable=not progress,
                         mininterval=5, file=sys.stderr):
            parts.append(part)
    images = np.concatenate(parts) if parts else np.zeros((0, SIZE, SIZE), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, images)
    tmp.replace(path)
    return images, labels


# ---------------------------------------------------------------------------- manifest and export

def gb2312_level1() -> list[str]:
    """The 3,755 level-1 GB2312 characters (rows 16-55), in codec order."""
    out = []
    for b1 in range(0xB0, 0xD8):
        for b2 in range(0xA1, 0xFF):
            try:
                out.append(bytes([b1, b2]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return out


def build_manifest(families: list[dict]) -> dict:
    """Hash every face's file, keep the level-1 characters every face covers, first 1000."""
    from fontTools.ttLib import TTCollection, TTFont

    covered = None
    for fam in families:
        for f in fam["faces"]:
            f["sha256"] = file_sha256(f["file"])
            font = (TTCollection(f["file"]).fonts[f["index"]] if f["file"].endswith((".ttc", ".otc"))
                    else TTFont(f["file"], lazy=True))
            cmap = set((font.getBestCmap() or {}).keys())
            covered = cmap if covered is None else covered & cmap
    # Some faces map a code point to an empty glyph (seen: AoyagiKouzanT and 啊): keep only
    # characters that also render ink in every face.
    chars = [c for c in gb2312_level1() if ord(c) in covered]
    for fam in families:
        for f in fam["faces"]:
            font = ImageFont.truetype(f["file"], size=24, index=f["index"])
            chars = [c for c in chars if font.getmask(c).getbbox() is not None]
    if len(chars) < NUM_CLASSES:
        raise ValueError(f"only {len(chars)} level-1 characters are covered by every face")
    return {"generator_version": GENERATOR_VERSION, "covered_and_inked_by_all": len(chars),
            "classes": chars[:NUM_CLASSES], "families": families}


def export(spec: str, out: str | Path, limit: int | None = None) -> int:
    """Write the first ``limit`` images of a han1000 split as PNGs, one subfolder per character."""
    split = spec.split(":", 1)[1] if spec.startswith("han1000:") else spec
    images, labels = render_split(split, limit)
    names = classes()
    out = Path(out)
    for i, (img, y) in enumerate(zip(images, labels)):
        sub = out / names[y]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(sub / f"{split}_{i:06d}.png")
    return len(images)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="han1000 glyph data")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a split as an image folder, one subfolder per character")
    e.add_argument("spec", help="han1000:train|holdout|test|ood")
    e.add_argument("out")
    e.add_argument("--limit", type=int, default=None)
    sub.add_parser("manifest", help="rehash the fonts of han_fonts.json and recompute the classes")
    args = p.parse_args(argv)
    if args.cmd == "export":
        n = export(args.spec, args.out, args.limit)
        print(f"wrote {n} images under {args.out}/<character>/")
    else:
        fams = [{k: v for k, v in fam.items()} for fam in manifest()["families"]]
        MANIFEST.write_text(json.dumps(build_manifest(fams), ensure_ascii=False, indent=1) + "\n",
                            encoding="utf-8")
        print(f"wrote {MANIFEST}")


if __name__ == "__main__":
    main()
