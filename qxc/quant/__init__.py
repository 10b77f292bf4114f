"""Quantization numerics shared by every quantizing pass."""

from qxc.quant.numerics import (
    QTYPES,
    Granularity,
    NonFiniteError,
    QType,
    QuantizedTensor,
    compute_params,
    dequantize,
    qtype,
    quantize,
    quantize_tensor,
    sqnr_db,
)

__all__ = ["QTYPES", "Granularity", "NonFiniteError", "QType", "QuantizedTensor", "compute_params", "dequantize",
           "quantize", "quantize_tensor", "qtype", "sqnr_db"]
