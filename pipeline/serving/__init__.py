"""Inference: the HTTP service (``server``), the hot-swapped model (``model_store``),
MNIST-style image preprocessing (``imaging``) and the ``predict`` CLI (``predict_cli``).

Importing the package is cheap; FastAPI and onnxruntime load with the submodules.
"""
