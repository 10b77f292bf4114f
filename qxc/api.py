"""The Python entry points: ``qxc.compile_model(model, "cleanup,quantize-weights{bits=4}", data=...)``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qxc import ir as qir
from qxc.data import Dataset, first_sample, load_data
from qxc.pipeline import CompileResult, Instrument, PassContext, PassManager, Step, VerifierInstrument, resolve_pipeline

load = qir.load
save = qir.save


def compile_model(model: Any, pipeline: str | os.PathLike | Sequence[Step], *, data: Any = None, verify: bool = True,
                  verify_runtime: bool = False, providers: Sequence[str] = ("cpu",), seed: int = 0,
                  instruments: Sequence[Instrument] = (), failure_path: str | os.PathLike | None = None,
                  check_input: bool = True, ranges: Any = None, source: str | os.PathLike | None = None
                  ) -> CompileResult:
    """Run a pipeline (text, recipe path/name or steps) on a model (path, ModelProto, ir.Model or gs.Graph).

    ``data`` is a path (.npz/.npy/.csv), a :class:`~qxc.data.Dataset`, a dict of arrays or a list of feed dicts.
    The model is changed in place when an ``ir.Model`` is given; the result holds it and the per-pass records.
    ``source``: the input model's file (taken from ``model`` when it is a path), read again only if onnxruntime cannot
    run the compiled model, to tell whether it could run the input.
    """
    steps = resolve_pipeline(pipeline)
    if source is None and isinstance(model, (str, os.PathLike)):
        source = model
    model = qir.coerce_model(model)
    if check_input:
        qir.check(model)
    ir_before = model.ir_version
    moved = qir.detach_initializer_inputs(model)
    dataset = None
    if data is not None:
        dataset = data if isinstance(data, Dataset) else load_data(data, model)
    if ranges is not None and not hasattr(ranges, "ranges"):
        from qxc.calibrate import Ranges

        ranges = Ranges.load(ranges)
    context = PassContext(data=dataset, ranges=ranges, providers=tuple(providers), seed=seed)
    extra = [VerifierInstrument(runtime=verify_runtime, providers=providers, source=source,
                                sample=None if dataset is None else first_sample(dataset, model))] if verify else []
    manager = PassManager(steps, context=context, instruments=[*extra, *instruments], failure_path=failure_path)
    result = manager.run(model)
    result.warnings += [w for v in extra for w in v.warnings]
    if moved:
        result.notes.append(f"IR version raised from {ir_before} to 4: {len(moved)} initializers that IR {ir_before} "
                            "had to list as graph inputs are constants now (the passes may rewrite them)")
    return result
