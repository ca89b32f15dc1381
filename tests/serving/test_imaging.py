"""MNIST-style preprocessing of uploaded images (pipeline/serving/imaging.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from pipeline.core.errors import ImageDecodeError
from pipeline.serving.imaging import WORK_SIDE, decode, normalise_digit, to_mnist
from tests.helpers.hostile import huge_png, lying_jpeg, lying_png


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def drawn_digit(size: tuple[int, int] = (300, 200), ink: int = 0, paper: int = 255) -> Image.Image:
    """A '7'-like stroke drawn off-centre on a large canvas (dark on light by default)."""
    img = Image.new("L", size, paper)
    d = ImageDraw.Draw(img)
    d.line([(40, 30), (140, 30), (80, 170)], fill=ink, width=12)
    return img


def ink_box(img: np.ndarray, thresh: float = 0.2 * 255) -> tuple[int, int, int, int]:
    rows = np.flatnonzero((img > thresh).any(axis=1))
    cols = np.flatnonzero((img > thresh).any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(img.shape)
    return float((ys * img).sum() / img.sum()), float((xs * img).sum() / img.sum())


def test_large_dark_on_light_png_becomes_mnist_like() -> None:
    out = to_mnist(encode(drawn_digit()))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255 and out.max() > 200
    # Inverted: background black, ink bright.
    assert out[0].max() == 0 and out[:, 0].max() == 0
    top, bottom, left, right = ink_box(out)
    assert max(bottom - top + 1, right - left + 1) in (19, 20, 21)  # longest side fits 20 px
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14.0) <= 0.5 and abs(cx - 14.0) <= 0.5


def test_polarity_does_not_matter() -> None:
    dark_on_light = to_mnist(encode(drawn_digit(ink=0, paper=255)))
    light_on_dark = to_mnist(encode(drawn_digit(ink=255, paper=0)))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1.0)


def test_aspect_ratio_is_kept() -> None:
    img = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(img).rectangle([100, 50, 149, 249], fill=0)  # 50 wide x 200 tall
    top, bottom, left, right = ink_box(to_mnist(encode(img)), thresh=128)
    assert bottom - top + 1 == 20
    assert right - left + 1 == 5


def test_jpeg_rgb_and_grey_background_photo() -> None:
    img = drawn_digit(ink=40, paper=200).convert("RGB")
    out = to_mnist(encode(img, "JPEG", quality=70))
    reference = to_mnist(encode(drawn_digit()))
    assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.95


def test_transparent_canvas_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))  # fully transparent black
    ImageDraw.Draw(rgba).ellipse([30, 20, 60, 80], outline=(0, 0, 0, 255), width=6)
    out = to_mnist(encode(rgba))
    assert out.max() > 200 and out[0].max() == 0


def test_sixteen_bit_png() -> None:
    arr = np.zeros((60, 60), dtype=np.uint16)
    arr[10:50, 25:35] = 60000
    out = to_mnist(encode(Image.fromarray(arr)))
    assert out.max() > 200 and ink_box(out, 128)[1] - ink_box(out, 128)[0] + 1 == 20


def test_real_mnist_digit_round_trips(mnist_prepared: object) -> None:
    """An upscaled, inverted real MNIST digit comes back close to the original."""
    from pathlib import Path

    from pipeline.data.dataset import load_split

    images = load_split(Path(str(mnist_prepared)), "test").images[:100]
    corr = []
    for original in images:
        big = Image.fromarray(255 - np.asarray(original)).resize(
            (280, 280), Image.Resampling.BICUBIC
        )
        out = to_mnist(encode(big))
        corr.append(np.corrcoef(out.ravel(), original.astype(np.float32).ravel())[0, 1])
    # A 1 px rounding shift of a thin stroke costs some correlation; most land exactly.
    assert np.median(corr) > 0.95
    assert np.min(corr) > 0.6


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (encode(Image.new("L", (10, 10)), "GIF"), "unsupported image format GIF"),
        (encode(drawn_digit())[:200], "corrupt or truncated PNG"),
        (encode(Image.new("L", (50, 50), 255)), "no digit found"),
        (encode(Image.new("L", (50, 50), 0)), "no digit found"),
    ],
)
def test_bad_inputs_raise_named_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        to_mnist(data)


def test_pixel_cap_is_checked_before_decoding() -> None:
    data = encode(Image.new("L", (5000, 5000), 255))  # ~25 kB PNG, 25 Mpx decoded
    assert len(data) < 100_000
    with pytest.raises(ImageDecodeError, match="5000x5000"):
        to_mnist(data, max_pixels=1_000_000)


def test_normalise_digit_rejects_non_2d() -> None:
    with pytest.raises(ImageDecodeError, match="2-D"):
        normalise_digit(np.zeros((3, 4, 5)))


def test_lying_jpeg_is_refused_before_decoding() -> None:
    """~2 KB of JPEG whose header claims 6000x6000 (libjpeg would pad with grey)."""
    data = lying_jpeg()
    assert len(data) < 2500 and Image.open(io.BytesIO(data)).size == (6000, 6000)
    with pytest.raises(ImageDecodeError, match="6000x6000 = 36000000 pixels; the limit is 16"):
        to_mnist(data)
    # Even when the size limits allow it, too little data for the declared size is refused.
    with pytest.raises(ImageDecodeError, match=r"truncated JPEG: the header declares 6000x6000"):
        to_mnist(data, max_pixels=50_000_000)
    with pytest.raises(ImageDecodeError, match=r"truncated JPEG: the header declares 3000x3000"):
        to_mnist(lying_jpeg(3000, 3000))


def test_truncated_files_are_refused() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError, match="corrupt or truncated PNG"):
        to_mnist(lying_png())  # 200x200 of data, IHDR says 2000x2000 (CRC valid)
    full = encode(drawn_digit(), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated JPEG"):
        to_mnist(full[: len(full) * 2 // 3])  # cut without an end marker


def test_huge_png_is_refused_by_its_header() -> None:
    data = huge_png()
    assert len(data) < 250_000
    with pytest.raises(ImageDecodeError, match="6300x6300 = 39690000 pixels"):
        to_mnist(data)
    with pytest.raises(ImageDecodeError, match="9000x10; the limit is 8192 pixels a side"):
        to_mnist(encode(Image.new("L", (9000, 10), 255)))


def test_large_images_are_reduced_not_changed() -> None:
    """A 4800x3200 photo (JPEG: decoded at reduced scale) gives the digit of its 300x200 copy."""
    small = drawn_digit()
    big = small.resize((4800, 3200), Image.Resampling.BICUBIC)
    reference = to_mnist(encode(small))
    for fmt in ("PNG", "JPEG"):
        out = to_mnist(encode(big, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
        assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.95
        assert decode(encode(big, fmt)).size[0] <= 2 * WORK_SIDE


def test_importing_the_server_keeps_truncated_loading_off() -> None:
    import pipeline.serving.server  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
