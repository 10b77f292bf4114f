"""Thread settings around onnxruntime: numpy's BLAS on one thread where the two alternate."""

from __future__ import annotations

import functools


@functools.cache
def _threadpools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # ~2 ms to find the loaded BLAS libraries: once per process


def serial_blas(fn):
    """Run ``fn`` with numpy's BLAS on one thread.

    For code that alternates onnxruntime runs with numpy linear algebra on small matrices: onnxruntime's intra-op
    threads keep spinning for a while after a run, and BLAS threads started meanwhile fight them for the cores
    (on 2 cores a batched 20 x 65 x 500 Gram took 28 ms right after onnxruntime runs against 3 ms on one thread).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _threadpools().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper
