"""Built-in passes; importing this package registers them. One pass per module."""

from qxc.passes import (  # noqa: F401
    cleanup,
    fold_batchnorm,
    fold_constants,
    insert_qdq,
    instrument,
    prune_channels,
    prune_magnitude,
    prune_nm,
    quantize_weights,
)
