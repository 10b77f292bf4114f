"""onnxruntime sessions: providers by name with availability checks and CPU fallback, batched inference."""

from qxc.runtime.session import (
    PROVIDER_ALIASES,
    make_session,
    resolve_providers,
    run_batched,
)
from qxc.runtime.threads import serial_blas

__all__ = ["PROVIDER_ALIASES", "make_session", "resolve_providers", "run_batched", "serial_blas"]
