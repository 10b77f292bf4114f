"""Built-in passes; importing this package registers them. One pass per module."""

from qxc.passes import cleanup, fold_constants, insert_qdq, instrument, quantize_weights  # noqa: F401
