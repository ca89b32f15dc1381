"""Turn an arbitrary PNG/JPEG of a handwritten digit into an MNIST-style 28x28 image.

MNIST digits were made by size-normalising each digit to fit a 20x20 box (keeping its
aspect ratio, with anti-aliasing) and centring it in a 28x28 field by its centre of
mass, white ink on black. :func:`to_mnist` repeats that on any photo or drawing:

1. decode (PNG or JPEG only) within declared-size limits read from the header, reduce
   anything larger than ``WORK_SIDE`` (the digit ends up 20 px tall anyway), apply the
   EXIF orientation, flatten alpha onto white;
2. greyscale; invert when the background (the median of the border) is light;
3. subtract the background level and stretch the ink to 0..255;
4. crop to the bounding box of the ink;
5. scale the longer side to 20 px (Lanczos), keeping the aspect ratio;
6. paste into a black 28x28 field so the centre of mass lands on the centre.

The result is ``(28, 28) float32`` in ``[0, 255]``: what the ONNX model takes as raw
pixels (the normalisation is inside the graph).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.core.contract import DIGIT_BOX as BOX
from pipeline.core.contract import IMAGE_SIDE as SIDE
from pipeline.core.errors import ImageDecodeError

COM_TARGET = 14.0
ALLOWED_FORMATS = ("PNG", "JPEG")
# Ink must rise this far above the background (0..255) to count as a digit at all.
MIN_CONTRAST = 16.0
# After stretching, pixels above this fraction of full ink belong to the bounding box;
# the low tail (JPEG noise, paper texture) is cut so it cannot widen the box.
INK_FRACTION = 0.2
# Larger images are reduced (JPEG: by the decoder itself, 1/2..1/8 scale) to at most
# about this many pixels a side before any float copy: it bounds the memory of one
# decode, and the digit ends up 20 px tall anyway.
WORK_SIDE = 1024
# A Huffman-coded JPEG spends at least one bit on every 8x8 block of its declared size
# (the DC code of its first scan). Less data than that cannot fill the image: libjpeg
# would pad the missing blocks with grey and report success, so we refuse it instead.
# (Arithmetic-coded JPEGs of flat content could go below this; they are refused too.)
JPEG_MIN_BITS_PER_BLOCK = 1
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_SIDE = 8192

FloatImage = npt.NDArray[np.float32]


def decode(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> Image.Image:
    """Decode PNG/JPEG bytes into an upright greyscale ``L`` image, at most ~``WORK_SIDE`` a side.

    Transparent pixels are composited onto white (a drawing on a transparent canvas
    reads as ink on paper). Raises :class:`ImageDecodeError` for empty data, anything
    that is not a PNG or JPEG, a side over ``max_side`` or more than ``max_pixels``
    pixels (both read from the header, before anything is decompressed), and a file
    that holds less data than its header declares (truncated: PIL would otherwise
    pad the missing part with grey).
    """
    if not data:
        raise ImageDecodeError("empty file: expected a PNG or JPEG image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover - a process-wide misconfiguration
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images pass")
    fmt: str | None = None
    try:
        with warnings.catch_warnings():
            # Our own pixel cap replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))  # lazy: reads the header only
            fmt = opened.format
            if fmt not in ALLOWED_FORMATS:
                raise ImageDecodeError(
                    f"unsupported image format {fmt}: expected one of {', '.join(ALLOWED_FORMATS)}"
                )
            width, height = opened.size
            check_declared_size(width, height, max_pixels, max_side)
            if fmt == "JPEG":
                _check_jpeg_data(len(data), width, height)
                # Let libjpeg decode at 1/2..1/8 scale: big photos never exist full size.
                opened.draft(opened.mode, _work_size(width, height))
            opened.load()
            img = _reduce(opened)
            img = ImageOps.exif_transpose(img) or img
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not an image: cannot identify a PNG or JPEG in the data") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports truncated/corrupt data as OSError, broken PNG chunks as SyntaxError.
        raise ImageDecodeError(f"corrupt or truncated {fmt or 'image'}: {err}") from err
    return _to_grey(img)


def check_declared_size(width: int, height: int, max_pixels: int, max_side: int) -> None:
    """Raise :class:`ImageDecodeError` when a header declares more than the limits allow."""
    if width > max_side or height > max_side:
        raise ImageDecodeError(f"image is {width}x{height}; the limit is {max_side} pixels a side")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _check_jpeg_data(size: int, width: int, height: int) -> None:
    blocks = -(-width // 8) * -(-height // 8)
    needed = blocks * JPEG_MIN_BITS_PER_BLOCK // 8
    if size < needed:
        raise ImageDecodeError(
            f"truncated JPEG: the header declares {width}x{height} ({blocks} blocks of 8x8, "
            f"at least {needed} bytes of data) but the file holds {size} bytes"
        )


def _work_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, WORK_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reduce(img: Image.Image) -> Image.Image:
    """Box-reduce by an integer factor so the longer side is at most ~``WORK_SIDE``."""
    factor = max(img.size) // WORK_SIDE
    if factor < 2:
        return img
    if img.mode in ("P", "1"):  # no reduce for these: expand first (alpha kept)
        img = img.convert("RGBA")
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    return img.reduce(factor)


def _to_grey(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("L")


def to_mnist(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> FloatImage:
    """PNG/JPEG bytes -> ``(28, 28) float32`` in ``[0, 255]``, MNIST style (see module doc).

    Raises :class:`ImageDecodeError` (see :func:`decode` for the limits).
    """
    return normalise_digit(np.asarray(decode(data, max_pixels, max_side), dtype=np.float32))


def normalise_digit(grey: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> FloatImage:
    """``(H, W)`` greyscale in ``[0, 255]`` (any background) -> ``(28, 28) float32``.

    Raises :class:`ImageDecodeError` when the image has no ink (no contrast).
    """
    g = np.asarray(grey, dtype=np.float32)
    if g.ndim != 2 or g.size == 0:
        raise ImageDecodeError(f"expected a 2-D greyscale image, got shape {g.shape}")
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    background = float(np.median(border))
    if background > 127.5:
        g = 255.0 - g
        background = 255.0 - background
    peak = float(g.max())
    if peak - background < MIN_CONTRAST:
        raise ImageDecodeError(
            f"no digit found: the image is blank (ink contrast {peak - background:.0f} "
            f"of 255, need at least {MIN_CONTRAST:.0f})"
        )
    ink = np.clip((g - background) * (255.0 / (peak - background)), 0.0, 255.0)
    rows = np.flatnonzero((ink > INK_FRACTION * 255.0).any(axis=1))
    cols = np.flatnonzero((ink > INK_FRACTION * 255.0).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return _center(_fit_box(crop))


def _fit_box(crop: FloatImage) -> FloatImage:
    """Scale so the longer side is ``BOX`` px, keeping the aspect ratio (>= 1 px a side)."""
    h, w = crop.shape
    scale = BOX / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = Image.fromarray(crop.astype(np.float32), mode="F")
    # LANCZOS on mode F keeps fractional grey levels; clip its small ringing overshoot.
    small = np.asarray(img.resize((new_w, new_h), Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(small, 0.0, 255.0)


def _center(box: FloatImage) -> FloatImage:
    """Paste ``box`` (at most 20x20) into 28x28 with its centre of mass at the centre."""
    h, w = box.shape
    total = float(box.sum())
    ys, xs = np.indices(box.shape)
    if total > 0:
        cy, cx = float((ys * box).sum() / total), float((xs * box).sum() / total)
    else:  # pragma: no cover - normalise_digit guarantees ink
        cy, cx = (h - 1) / 2, (w - 1) / 2
    # MNIST puts the centre of mass at index (14, 14), not the geometric 13.5: measured
    # on the training set the mean is (13.99, 14.00), within [13.5, 14.5) (integer shifts).
    top = int(np.clip(round(COM_TARGET - cy), 0, SIDE - h))
    left = int(np.clip(round(COM_TARGET - cx), 0, SIDE - w))
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    out[top : top + h, left : left + w] = box
    return out
