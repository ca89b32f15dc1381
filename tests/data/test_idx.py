import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import IdxFormatError
from pipeline.data.idx import encode_images, encode_labels, gunzip, parse_images, parse_labels


def test_round_trip() -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([0, 9, 5], dtype=np.uint8)
    got = parse_images(encode_images(images))
    assert got.dtype == np.uint8 and got.shape == (3, 28, 28)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(parse_labels(encode_labels(labels)), labels)


def test_wrong_magic_names_both_numbers() -> None:
    raw = encode_labels(np.zeros(4, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"magic number 2049.*expected 2051"):
        parse_images(raw, "x.idx")
    with pytest.raises(IdxFormatError, match=r"magic number 2051.*expected 2049"):
        parse_labels(encode_images(np.zeros((1, 28, 28), np.uint8)))


def test_wrong_shape_and_count() -> None:
    raw = np.array([2051, 2, 32, 32], dtype=">u4").tobytes() + bytes(2 * 32 * 32)
    with pytest.raises(IdxFormatError, match="32x32, expected 28x28"):
        parse_images(raw)
    short = encode_images(np.zeros((3, 28, 28), np.uint8))[:-1]
    with pytest.raises(IdxFormatError, match="header says 3 images"):
        parse_images(short)
    extra = encode_labels(np.zeros(3, np.uint8)) + b"\x00"
    with pytest.raises(IdxFormatError, match="header says 3 labels but the payload is 4"):
        parse_labels(extra)
    with pytest.raises(IdxFormatError, match="shorter than"):
        parse_labels(b"\x00\x00")
    with pytest.raises(IdxFormatError, match="shorter than the 16-byte"):
        parse_images(np.array([2051, 5], dtype=">u4").tobytes())


def test_gzip_errors() -> None:
    data = gzip.compress(encode_labels(np.zeros(100, np.uint8)))
    with pytest.raises(IdxFormatError, match="truncated gzip"):
        gunzip(data[: len(data) // 2], "f.gz")
    with pytest.raises(IdxFormatError, match="not a valid gzip"):
        gunzip(b"plain bytes", "f.gz")


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=16 + 2 * 784 - 1))
def test_any_truncation_is_a_format_error(cut: int) -> None:
    raw = encode_images(np.ones((2, 28, 28), np.uint8))
    with pytest.raises(IdxFormatError):
        parse_images(raw[:cut])
