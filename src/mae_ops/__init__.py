"""mae-ops: MAE pre-training, fine-tuning and ONNX export as a reproducible pipeline."""

__version__ = "0.1.0"
