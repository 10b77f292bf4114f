"""qxc: an ONNX model-transformation compiler (quantization, pruning, calibration, explanation) on onnx-ir."""

from __future__ import annotations

__version__ = "0.1.0"

from qxc.api import compile_model, load, save  # noqa: E402

__all__ = ["__version__", "compile_model", "load", "save"]
