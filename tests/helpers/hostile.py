"""Hostile uploads, built for real with Pillow (shared by the tests and
``benchmarks/hostile_load_test.py``).

- :func:`lying_jpeg`: ~1.7 KB JPEG of a 200x200 digit whose SOF header claims 6000x6000
  (libjpeg would pad the missing 35.96 M pixels with grey and report success);
- :func:`huge_png`: a real 6300x6300 PNG (~40 M pixels) that compresses to ~100-200 KB;
- :func:`lying_png`: a 200x200 PNG whose IHDR (CRC fixed) claims 2000x2000.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def digit_image(size: int = 200) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).line(
        [(size * 0.2, size * 0.15), (size * 0.75, size * 0.15), (size * 0.4, size * 0.85)],
        fill=0,
        width=max(2, size // 16),
    )
    return img


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def lying_jpeg(width: int = 6000, height: int = 6000) -> bytes:
    data = bytearray(encode(digit_image(), "JPEG", quality=45))
    sof = data.find(b"\xff\xc0")  # baseline SOF0: FFC0 len(2) precision(1) height(2) width(2)
    assert sof > 0
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def huge_png(side: int = 6300) -> bytes:
    img = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(img)
    draw.ellipse([side // 5, side // 8, side * 4 // 5, side * 7 // 8], outline=0, width=side // 20)
    # Some texture so it is not a trivially compressible blank: ~100-200 KB on disk.
    noise = np.random.default_rng(0).integers(0, 256, (side // 24, side // 24), dtype=np.uint8)
    img.paste(Image.fromarray(noise), (0, 0))
    return encode(img, "PNG", optimize=True)


def lying_png(width: int = 2000, height: int = 2000) -> bytes:
    data = bytearray(encode(digit_image(), "PNG"))
    ihdr = data.find(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    struct.pack_into(">I", data, ihdr + 17, zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def three_class_onnx() -> bytes:
    """A real ONNX model with the contract's names and input, but 3 output classes.

    ``image`` float32 [N,1,28,28] -> Flatten -> MatMul (784x3) -> ``logits`` [N,3] ->
    Softmax -> ``probabilities`` [N,3]; opset 18, IR version 10 like the exporter's.
    """
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(0, 0.01, (784, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "three_classes",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return bytes(model.SerializeToString())
