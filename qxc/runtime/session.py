"""Session factory over onnxruntime.

Models are handed to onnxruntime as serialized bytes with external tensors kept as references; the folder holding
their data is given to the session, so large weights are read in place rather than copied to a temporary file.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qxc import ir as qir
from qxc.errors import DataError, ModelError, UsageError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_OPT_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderFallbackWarning(UserWarning):
    pass


def resolve_providers(requested: Sequence[str] | str, *, available: Iterable[str] | None = None,
                      strict: bool = False) -> list[str]:
    """Map names (``cpu``, ``cuda``, ``tensorrt`` or full provider names) to the ones onnxruntime has.

    Unavailable providers are dropped with a :class:`ProviderFallbackWarning` (CPU is always appended as the last
    resort), or raise a UsageError under ``strict``.
    """
    if isinstance(requested, str):
        requested = [p for p in requested.split(",") if p.strip()]
    available = list(ort.get_available_providers() if available is None else available)
    chosen: list[str] = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in PROVIDER_ALIASES.values() and not full.endswith("ExecutionProvider"):
            raise UsageError(f"unknown execution provider '{name}'; use one of {', '.join(PROVIDER_ALIASES)} "
                             "or a full onnxruntime provider name")
        if full in available:
            if full not in chosen:
                chosen.append(full)
            continue
        msg = (f"execution provider '{name}' ({full}) is not available in this onnxruntime build "
               f"(available: {', '.join(available)})")
        if strict:
            raise UsageError(msg + "; install onnxruntime-gpu (pip install 'qxc[gpu]') or drop --strict-provider")
        warnings.warn(msg + "; falling back", ProviderFallbackWarning, stacklevel=2)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(*, threads: int | None = None, optimization: str = "all",
                    prepacking: bool = True) -> ort.SessionOptions:
    if optimization not in _OPT_LEVELS:
        raise UsageError(f"unknown optimization level '{optimization}'; use one of {', '.join(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[optimization]
    so.log_severity_level = 4  # fatal only: qxc turns onnxruntime's errors into its own one-line messages
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def make_session(model: ir.Model | str | os.PathLike, *, providers: Sequence[str] | str = ("cpu",),
                 threads: int | None = None, optimization: str = "all", prepacking: bool = True,
                 strict_provider: bool = False, available: Iterable[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session for an IR model or a model file; load failures become one-line ModelErrors.

    For an IR model whose weights are memory-mapped external data, the session is handed those very buffers
    (``add_initializer``) instead of reading its own copy: the weights are resident once, in the pages qxc maps.
    """
    so = session_options(threads=threads, optimization=optimization, prepacking=prepacking)
    chosen = resolve_providers(providers, available=available, strict=strict_provider)
    try:
        if isinstance(model, ir.Model):
            folders = {str(p.parent) for p in qir.external_files(model)}
            if len(folders) > 1:
                raise ModelError(f"external data spread over several folders ({', '.join(sorted(folders))})")
            keep = []
            if folders:
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", folders.pop())
                if chosen == ["CPUExecutionProvider"]:
                    keep = _share_external_weights(model, so)
            session = ort.InferenceSession(qir.model_bytes(model), sess_options=so, providers=chosen)
            session._qxc_shared_weights = keep  # the buffers must outlive the session
            return session
        return ort.InferenceSession(str(model), sess_options=so, providers=chosen)
    except ModelError:
        raise
    except Exception as e:  # onnxruntime raises Fail/InvalidGraph/RuntimeException with multi-line text
        raise ModelError(f"onnxruntime cannot load the model: {qir._first_line(e)}") from e


def _share_external_weights(model: ir.Model, so: ort.SessionOptions) -> list:
    keep = []
    inputs = {v.name for v in model.graph.inputs}
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor) and value.name not in inputs:
            arr = t.numpy()
            if not arr.flags.c_contiguous or arr.dtype.kind not in "fiub":
                continue
            ov = ort.OrtValue.ortvalue_from_numpy(arr)
            so.add_initializer(value.name, ov)
            keep.append((arr, ov))
    return keep


def normalize_output(value) -> np.ndarray:
    """skl2onnx classifiers return ZipMap lists of dicts: turn them into a (rows, classes) float array."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float32)
    return np.asarray(value)


def run(session: ort.InferenceSession, names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list:
    """``session.run``, with onnxruntime's failure on the data (an index out of range, an unknown category, a shape
    the model cannot take) as a one-line DataError: the data, not qxc, is at fault."""
    try:
        return session.run(names, feed)
    except Exception as e:  # onnxruntime's exception types are not public; its messages are multi-line
        raise DataError(f"onnxruntime failed on the sample data: {run_failure(e)}") from e


def run_failure(e: Exception) -> str:
    """onnxruntime's run failure in one line: the node, and the end of its message (its start is often a C++
    signature; the end says what was wrong)."""
    text = " ".join(str(e).split())
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    where = f"{node.group(1)} node '{node.group(2)}': " if node else ""
    return where + (text if len(text) <= 300 else "..." + text[-240:])


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray], *, batch_size: int = 1024,
                output_names: Sequence[str] | None = None, progress: bool = False) -> list[np.ndarray]:
    """Run ``feeds`` (batch along axis 0) in chunks of ``batch_size`` rows and concatenate each output."""
    n = len(next(iter(feeds.values())))
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    starts = range(0, n, batch_size)
    if progress:
        from qxc.runtime.progress import progress as bar

        starts = bar(starts, total=len(starts), desc="running")
    for s in starts:
        chunk = {k: v[s : s + batch_size] for k, v in feeds.items()}
        for i, out in enumerate(run(session, names, chunk)):
            parts[i].append(normalize_output(out))
    return [np.concatenate(p, axis=0) if p else np.empty((0,)) for p in parts]
