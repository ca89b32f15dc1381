"""The export stage: ONNX export, parity, quantization, onnxruntime sessions and ONNX
metadata."""
