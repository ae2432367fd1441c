"""Decoding user images robustly into fixed-size uint8 arrays (PIL + numpy only,
so that serving code can use it without importing torch)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
TYPE_BITS = 16  # the bits of a 16-bit file's own range (0..65535): data.bit_depth's default


class ImageReadError(Exception):
    """The file is not a usable image; the message is the reason recorded in manifests."""


class Decoded(NamedTuple):
    """One file as prepare stores it, and whether the decoder had to clip its values."""

    pixels: np.ndarray  # (C, size, size) uint8
    clipped: bool  # values outside the range _to_8bit reads (see values_out_of_range)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def peek_is_gray(path: Path) -> bool | None:
    """Colour model from the header alone (cheap); None when unreadable."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                return _palette_is_gray(img)
            return img.mode in GRAY_MODES
    except Exception:
        return None


def _palette_is_gray(img: Image.Image) -> bool:
    palette = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())


def _full_scale(img: Image.Image, bit_depth: int) -> float:
    """The value a 16/32-bit integer or float image's white is read at (0 its black): the one
    range that ``_to_8bit`` scales by and ``values_out_of_range`` checks."""
    return 1.0 if img.mode == "F" else float(2**bit_depth - 1)


def _to_8bit(img: Image.Image, bit_depth: int = TYPE_BITS) -> Image.Image:
    """16/32-bit integer and float images scaled to 8 bits by a fixed range, never by their
    content, so one value is one pixel in every file: integers 0..2**bit_depth - 1 (16: the
    type's; Pillow widens a 16-bit PGM's maxval to it; values beyond are clipped), floats 0..1.
    (A rule read off each image's maximum mapped 200 to 200 in a dark frame, to 1 beside a
    pixel over 255.)"""
    arr = np.asarray(img, dtype=np.float64)
    arr = np.clip(arr / _full_scale(img, bit_depth) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def values_out_of_range(img: Image.Image, bit_depth: int = TYPE_BITS) -> bool:
    """Whether a 16/32-bit integer or float image holds values that ``_to_8bit`` clips: integers
    outside 0..2**bit_depth - 1 (a data.bit_depth below the sensor's bits, or a camera that
    stores its bits high in the 16-bit word), floats outside 0..1. 8-bit images never clip."""
    if img.mode not in _HIGH_DEPTH_MODES:
        return False
    low, high = img.getextrema()
    return low < 0 or high > _full_scale(img, bit_depth)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Transparent pixels become white, as image viewers show them."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def normalize_mode(img: Image.Image, channels: int, bit_depth: int = TYPE_BITS) -> Image.Image:
    """Any PIL mode (CMYK, palette, RGBA, 16-bit, 1-bit, ...) -> 'L' or 'RGB'."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _to_8bit(img, bit_depth)
    elif (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = _flatten_alpha(img)
    return img.convert("L" if channels == 1 else "RGB")


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square and resize to ``size`` (antialiased)."""
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)


def image_to_array(img: Image.Image, size: int, channels: int, bit_depth: int = TYPE_BITS) -> np.ndarray:
    img = fit_square(normalize_mode(img, channels, bit_depth), size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def eval_side(img_size: int, crop_pct: float) -> int:
    """The side evaluation resizes to before its centre crop (timm: floor(img_size / crop_pct))."""
    return max(img_size, int(img_size / crop_pct + 1e-6))


def center_crop(side: int, img_size: int) -> slice:
    """Rows (and columns) of the centre ``img_size`` crop of a ``side`` square, as timm cuts it;
    numpy here, torch on the device (data.center_view) cut the same pixels."""
    off = round((side - img_size) / 2)
    return slice(off, off + img_size)


def eval_view(batch: np.ndarray, img_size: int, crop_pct: float) -> np.ndarray:
    """timm's evaluation transform on stored squares, (n, C, S, S) uint8 -> (n, C, img_size,
    img_size): resize to ``eval_side`` (only when the store has another side), centre crop."""
    side = eval_side(img_size, crop_pct)
    if batch.shape[-1] != side:
        resized = np.empty((*batch.shape[:2], side, side), dtype=np.uint8)
        for i, img in enumerate(batch):
            for c, ch in enumerate(img):
                resized[i, c] = np.asarray(Image.fromarray(ch).resize((side, side), Image.Resampling.BICUBIC))
        batch = resized
    crop = center_crop(side, img_size)
    return np.ascontiguousarray(batch[..., crop, crop])


def load_eval_image(
    path: str | Path, img_size: int, channels: int, crop_pct: float, bit_depth: int = TYPE_BITS
) -> Decoded:
    """A file as evaluation and serving see it: centre square at ``eval_side``, centre crop."""
    stored, clipped = decode_file(path, eval_side(img_size, crop_pct), channels, bit_depth)
    return Decoded(eval_view(stored[None], img_size, crop_pct)[0], clipped)


def decode_file(path: str | Path, size: int, channels: int, bit_depth: int = TYPE_BITS) -> Decoded:
    """Decode one file to a (channels, size, size) uint8 array, and whether its values were
    clipped, or raise ImageReadError; ``bit_depth``: the bits a 16/32-bit integer file's values
    use (data.bit_depth)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below `size`
                    img.draft(None, (size, size))
                img.load()  # forces the full decode: truncated files fail here
                img = ImageOps.exif_transpose(img)
                if img.width < 1 or img.height < 1:
                    raise ImageReadError("image has no pixels")
                return Decoded(image_to_array(img, size, channels, bit_depth), values_out_of_range(img, bit_depth))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"image too large: {exc}") from None
    except OSError as exc:
        raise ImageReadError(f"unreadable or truncated: {exc}") from None
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:  # malformed headers
        raise ImageReadError(f"corrupt image: {exc}") from None


def load_image(path: str | Path, size: int, channels: int, bit_depth: int = TYPE_BITS) -> np.ndarray:
    """Decode one file to a (channels, size, size) uint8 array or raise ImageReadError."""
    return decode_file(path, size, channels, bit_depth).pixels


def pixel_sums(block: np.ndarray) -> np.ndarray:
    """(n, C, H, W) uint8 -> (n, C, 2) int64: per-channel sum and sum of squares (exact)."""
    flat = block.reshape(block.shape[0], block.shape[1], -1).astype(np.int64)
    return np.stack([flat.sum(-1), (flat * flat).sum(-1)], axis=-1)


def decode_into(
    store: str | Path, rows: list[int], paths: list[str], size: int, channels: int, bit_depth: int = TYPE_BITS
) -> tuple[list[str | None], np.ndarray, np.ndarray]:
    """Decode ``paths`` straight into rows of the memory-mapped .npy ``store`` (a worker
    process's share: no pixels travel back). Returns, per file, None or why it was
    skipped, its per-channel pixel sum and sum of squares, (n, C, 2) int64, and whether
    its values were clipped, (n,) bool."""
    arr = np.load(store, mmap_mode="r+")
    errors: list[str | None] = []
    sums = np.zeros((len(paths), channels, 2), dtype=np.int64)
    clipped = np.zeros(len(paths), dtype=bool)
    for i, (row, path) in enumerate(zip(rows, paths, strict=True)):
        try:
            img, clipped[i] = decode_file(path, size, channels, bit_depth)
            arr[row] = img
            sums[i] = pixel_sums(img[None])[0]
            errors.append(None)
        except ImageReadError as exc:
            errors.append(str(exc))
    arr.flush()
    del arr
    return errors, sums, clipped
