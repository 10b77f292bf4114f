"""Where chunk work runs: in this process, or on Ray actors that each hold one onnxruntime session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qxc.errors import QxcError, UsageError


class Worker:
    """Holds the model(s) and their sessions per process; runs ``fn(worker, chunk, *args)`` for a chunk."""

    def __init__(self, model_bytes: bytes | list[bytes], providers: Sequence[str], threads: int | None = None,
                 predictor_options: dict | None = None):
        from qxc import ir as qir

        blobs = model_bytes if isinstance(model_bytes, list) else [model_bytes]
        self.models = [qir.from_proto(b) for b in blobs]
        self.model = self.models[0]
        self.providers = tuple(providers)
        self.threads = threads  # Ray runs one actor per CPU: one onnxruntime thread each
        self.predictor_options = dict(predictor_options or {})  # explain's output and task, as run locally
        self.cache: dict[str, Any] = {}

    def run(self, fn: Callable, chunk, *args):
        return fn(self, chunk, *args)


class LocalBackend:
    name = "local"

    def __init__(self, model, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 predictor_options: dict | None = None):
        self.worker = Worker(_blobs(model), providers, threads, predictor_options)

    def map(self, fn: Callable, chunks: list, *args) -> list:
        return [self.worker.run(fn, c, *args) for c in chunks]

    def close(self) -> None:
        pass


class RayBackend:
    """Ray actors (one onnxruntime session each, restarted and retried by Ray when a worker dies)."""

    name = "ray"

    def __init__(self, model, providers: Sequence[str] = ("cpu",), *, address: str | None = None,
                 workers: int | None = None, max_retries: int = 3, predictor_options: dict | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError("--backend ray needs Ray: pip install 'qxc[ray]'") from None
        self.ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs = {"address": address} if address else {"num_cpus": workers or None}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **{k: v for k, v in kwargs.items() if v is not None})
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_restarts=max_retries, max_task_retries=max_retries)(Worker)
        blob = _blobs(model)  # inline argument: a restarted actor can always be rebuilt from it
        self.actors = [remote.remote(blob, tuple(providers), 1, predictor_options) for _ in range(n)]

    def map(self, fn: Callable, chunks: list, *args) -> list:
        ray = self.ray
        refs = [self.actors[i % len(self.actors)].run.remote(fn, c, *args) for i, c in enumerate(chunks)]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, QxcError):
                raise cause from None
            msg = " ".join(str(cause).split())[:300]
            raise QxcError(f"a Ray worker failed: {type(cause).__name__}: {msg}") from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._owns:
            self.ray.shutdown()


def _blobs(model) -> bytes | list[bytes]:
    from qxc import ir as qir

    if isinstance(model, list | tuple):
        return [qir.model_bytes(m) for m in model]
    return qir.model_bytes(model)


def make_backend(kind: str, model, providers: Sequence[str] = ("cpu",), *, address: str | None = None,
                 workers: int | None = None, threads: int | None = None, predictor_options: dict | None = None):
    """``threads``: onnxruntime's intra-op threads in the local worker (Ray actors run one each, one per CPU);
    ``predictor_options``: what the workers' explanation Predictors take (``output``, ``task``)."""
    if kind == "local":
        return LocalBackend(model, providers, threads, predictor_options)
    if kind == "ray":
        return RayBackend(model, providers, address=address, workers=workers, predictor_options=predictor_options)
    raise UsageError(f"unknown backend '{kind}'; use local or ray")
