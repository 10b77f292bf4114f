"""Thread settings around onnxruntime: numpy's BLAS on one thread where the two alternate."""

from __future__ import annotations

import contextlib
import threading

_lock = threading.Lock()
_controller = None


def _threadpools():
    global _controller
    with _lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()  # finds the loaded BLAS libraries: once per process
    return _controller


def prefetch_threadpools() -> None:
    """Find the BLAS libraries on a background thread (10-25 ms of path lookups), while onnxruntime runs."""
    if _controller is None:
        threading.Thread(target=_threadpools, daemon=True).start()


@contextlib.contextmanager
def serial_blas(enabled: bool = True):
    """numpy's BLAS on one thread within the block (when ``enabled``).

    For code that alternates onnxruntime runs with numpy linear algebra: onnxruntime's intra-op threads keep
    spinning for a while after a run, and BLAS threads started meanwhile fight them for the cores (on 2 cores a
    batched 20 x 65 x 500 Gram took 28 ms right after onnxruntime runs against 3 ms on one thread). Finding the
    BLAS libraries costs ~3-12 ms once per process, so small products (which BLAS runs on one thread anyway) should
    pass ``enabled=False``.
    """
    if not enabled:
        yield
        return
    with _threadpools().limit(limits=1, user_api="blas"):
        yield
