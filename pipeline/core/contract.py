"""The model contract: what every exported, gated, registered and served model looks like.

One place for the names and shapes that export writes, parity and the gate read, the
registry copies and the service checks on every load. No torch or onnxruntime import:
a service machine and the registry use it without the training stack.

- input ``image``: float32 ``(N, 1, 28, 28)``, raw pixels in ``[0, 255]`` (white digit on
  black); the normalisation ``(x / 255 - mean) / std`` is inside the graph;
- outputs ``logits`` and ``probabilities``: float32 ``(N, 10)``, class = index; the
  probabilities are the softmax of the logits.
"""

from __future__ import annotations

from typing import Final

MODEL_FILE: Final = "model.onnx"
MODEL_CARD_JSON: Final = "model_card.json"
MODEL_CARD_MD: Final = "model_card.md"
INPUT_NAME: Final = "image"
LOGITS: Final = "logits"
PROBABILITIES: Final = "probabilities"
OUTPUT_NAMES: Final = (LOGITS, PROBABILITIES)
NUM_CLASSES: Final = 10
IMAGE_SIDE: Final = 28
# MNIST digits are size-normalised into the central DIGIT_BOX x DIGIT_BOX square.
DIGIT_BOX: Final = 20
INPUT_SHAPE: Final = (1, IMAGE_SIDE, IMAGE_SIDE)  # per image, after the batch axis
PIXEL_MAX: Final = 255.0
ONNX_FLOAT: Final = "tensor(float)"

INPUT_CONTRACT: Final = (
    f"input '{INPUT_NAME}': float32 [N,1,{IMAGE_SIDE},{IMAGE_SIDE}], raw pixels 0..255 "
    "(white digit on black background); normalisation (x/255-mean)/std is inside the graph"
)
OUTPUT_CONTRACT: Final = (
    f"outputs '{LOGITS}' and '{PROBABILITIES}' (softmax): float32 [N,{NUM_CLASSES}], class = index"
)


def check_io(
    inputs: dict[str, tuple[str, list[str]]], outputs: dict[str, tuple[str, list[str]]]
) -> list[str]:
    """Violations of the contract by a model's declared inputs and outputs.

    ``inputs`` / ``outputs`` map a name to ``(onnx type, shape as strings)``, e.g.
    ``{"image": ("tensor(float)", ["N", "1", "28", "28"])}``; a symbolic or any batch
    dimension is accepted. Returns human-readable reasons; empty means the model conforms.
    """
    reasons: list[str] = []
    if list(inputs) != [INPUT_NAME]:
        reasons.append(f"expected one input named {INPUT_NAME!r}, got {sorted(inputs)}")
    else:
        dtype, shape = inputs[INPUT_NAME]
        if dtype != ONNX_FLOAT or len(shape) != 4 or shape[1:] != [str(d) for d in INPUT_SHAPE]:
            reasons.append(
                f"input {INPUT_NAME!r} must be float32 [N,1,{IMAGE_SIDE},{IMAGE_SIDE}], "
                f"got {dtype} {shape}"
            )
    for name in OUTPUT_NAMES:
        if name not in outputs:
            reasons.append(f"missing output {name!r}; has {sorted(outputs)}")
            continue
        dtype, shape = outputs[name]
        if dtype != ONNX_FLOAT or len(shape) != 2 or shape[1] != str(NUM_CLASSES):
            reasons.append(
                f"output {name!r} must be float32 [N,{NUM_CLASSES}], got {dtype} {shape}"
            )
    return reasons
