"""MNIST MLOps pipeline: one typed function per stage, `python -m pipeline <stage>`."""
