"""Model I/O and verification: the only module that touches the onnx protobuf library.

Everything else in qxc works on ``onnx_ir`` objects. Loading validates the file before anything is built from it
(empty, truncated, not ONNX, unsupported opset, unknown domain, external data that escapes the model folder or is
missing/short, tensors whose declared shape does not match their bytes); weights stored as external data stay
memory-mapped by onnx-ir. Saving is atomic: everything is written into a temporary folder beside the target and
renamed into place, so an interrupted run never leaves a partial file and never touches the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qxc.errors import ModelError, UsageError

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
#: Protobuf cannot hold more than 2 GiB; we switch to external data well before that.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
KNOWN_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training",
     "ai.onnx.training", "com.ms.internal.nhwc"}
)
SOURCE_KEY = "qxc:source"  # model.meta key holding the resolved path a model was loaded from
EXTERNAL_KEY = "qxc:external-data"  # model.meta key: the model was loaded with external data
#: model.meta key: {value name: serialized TypeProto} of the values whose type onnx-ir cannot hold (maps, such as
#: skl2onnx's ZipMap output, a sequence of maps); the values keep no type in the IR and get it back on the way out
HIDDEN_TYPES_KEY = "qxc:hidden-types"

_ITEMSIZE_BITS = {
    onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.FLOAT4E2M1: 4,
}


def _expected_nbytes(t: onnx.TensorProto) -> int | None:
    if t.data_type == onnx.TensorProto.STRING or t.data_type == onnx.TensorProto.UNDEFINED:
        return None
    n = math.prod(t.dims)
    bits = _ITEMSIZE_BITS.get(t.data_type)
    if bits is not None:
        return (n * bits + 7) // 8
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return n * itemsize


def _iter_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for t in graph.initializer:
        yield t, where
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, f"{where}/node '{node.name or node.op_type}'"
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensors(attr.g, f"{where}/{node.name or node.op_type}.{attr.name}")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, g in enumerate(attr.graphs):
                    yield from _iter_tensors(g, f"{where}/{node.name or node.op_type}.{attr.name}[{i}]")


def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def _validate_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse, in one line each, what would otherwise crash later or read outside the model folder."""
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no IR version, graph or opset import); is it the right file?")
    opsets = {o.domain: o.version for o in proto.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        raise ModelError(f"{path}: the model imports no default ('ai.onnx') opset")
    if not MIN_OPSET <= default <= MAX_OPSET:
        raise ModelError(
            f"{path}: opset {default} is outside the supported range {MIN_OPSET}..{MAX_OPSET}; "
            "convert it with onnx.version_converter first"
        )
    function_domains = {f.domain for f in proto.functions}
    for node in _iter_nodes(proto.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in function_domains:
            raise ModelError(
                f"{path}: node '{node.name or node.op_type}' uses op {node.domain}::{node.op_type} from a domain "
                "onnxruntime does not know and the model does not define; register its custom-op library or remove it"
            )
    folder = path.parent.resolve()
    for t, where in _iter_tensors(proto.graph, "graph"):
        expected = _expected_nbytes(t)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            location = info.get("location", "")
            if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
                raise ModelError(
                    f"{path}: tensor '{t.name}' ({where}) has external data at absolute path '{location}'; "
                    "only paths inside the model's folder are allowed"
                )
            target = (folder / location).resolve()
            if folder != target and folder not in target.parents:
                raise ModelError(
                    f"{path}: tensor '{t.name}' ({where}) points its external data outside the model folder "
                    f"('{location}'); refusing to read it"
                )
            if not target.is_file():
                raise ModelError(
                    f"{path}: external data file '{location}' of tensor '{t.name}' is missing; "
                    "copy it next to the model"
                )
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
            size = target.stat().st_size
            need = length if length is not None else expected
            if need is not None and offset + need > size:
                raise ModelError(
                    f"{path}: external data of tensor '{t.name}' needs bytes {offset}..{offset + need} "
                    f"but '{location}' has only {size}; the data file is truncated or belongs to another model"
                )
            if length is not None and expected is not None and length != expected:
                raise ModelError(
                    f"{path}: tensor '{t.name}' declares shape {list(t.dims)} ({expected} bytes) "
                    f"but its external data holds {length} bytes"
                )
        elif expected is not None:
            if t.HasField("raw_data") or t.raw_data:
                got = len(t.raw_data)
            else:
                got = None
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    values = getattr(t, field)
                    if len(values):
                        got = len(values)
                        expected = math.prod(t.dims)
                        if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                            expected *= 2
                        if t.data_type in _ITEMSIZE_BITS:
                            expected = (expected + 1) // 2
                        break
                if got is None:
                    got = 0
            if got != expected:
                raise ModelError(
                    f"{path}: tensor '{t.name}' ({where}) declares shape {list(t.dims)} "
                    f"({expected} {'bytes' if t.raw_data else 'values'}) but stores {got}; the file is corrupt"
                )


def _has_map(t: onnx.TypeProto) -> bool:
    kind = t.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _has_map(getattr(t, kind).elem_type)
    return False


def _graph_value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    """Every value info of ``graph`` and its subgraphs: inputs, outputs and value_info."""
    yield from (*graph.input, *graph.output, *graph.value_info)
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                      attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield from _graph_value_infos(g)


def _type_text(t: onnx.TypeProto) -> str:
    """onnxruntime's spelling of a type: ``seq(map(string,tensor(float)))``."""
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower()})"
    if kind == "sequence_type":
        return f"seq({_type_text(t.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_text(t.optional_type.elem_type)})"
    if kind == "map_type":
        key = onnx.TensorProto.DataType.Name(t.map_type.key_type).lower()
        return f"map({key},{_type_text(t.map_type.value_type)})"
    return str(kind)


def hidden_types(model: ir.Model) -> dict[str, str]:
    """The values whose type onnx-ir cannot hold (see :data:`HIDDEN_TYPES_KEY`) and their types, spelled out."""
    out = {}
    for name, blob in model.meta.get(HIDDEN_TYPES_KEY, {}).items():
        t = onnx.TypeProto()
        t.ParseFromString(blob)
        out[name] = _type_text(t)
    return out


def _deserialize(proto: onnx.ModelProto, *, copy: bool = False) -> ir.Model:
    """onnx-ir's model of ``proto``; map types, which onnx-ir cannot represent, are taken off their values first
    and kept in the model's meta (``copy``: leave the caller's proto untouched)."""
    hidden = {vi.name: vi.type.SerializeToString() for vi in _graph_value_infos(proto.graph) if _has_map(vi.type)}
    if hidden:
        if copy:
            original, proto = proto, onnx.ModelProto()
            proto.CopyFrom(original)
        for vi in _graph_value_infos(proto.graph):
            if vi.name in hidden:
                vi.ClearField("type")
    model = ir.serde.deserialize_model(proto)
    if hidden:
        model.meta[HIDDEN_TYPES_KEY] = hidden
    return model


def load(path: str | os.PathLike) -> ir.Model:
    """Load and validate a model; external weights stay memory-mapped."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{path}: not a readable ONNX protobuf (truncated or another format): {_first_line(e)}") from e
    except Exception as e:  # protobuf's C++ parser raises its own types
        raise ModelError(f"{path}: not a readable ONNX protobuf (truncated or another format): {_first_line(e)}") from e
    _validate_proto(proto, path)
    try:
        model = _deserialize(proto)
    except Exception as e:
        raise ModelError(f"{path}: cannot be read into the IR: {_first_line(e)}") from e
    del proto
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    model.meta[SOURCE_KEY] = str(path.resolve())
    model.meta[EXTERNAL_KEY] = bool(external_files(model))
    return model


def from_proto(proto: onnx.ModelProto | bytes, base_dir: str | os.PathLike = "") -> ir.Model:
    """Build an IR model from a ModelProto (or its bytes), e.g. one made with onnx.helper in user code."""
    if isinstance(proto, bytes | bytearray):
        proto = onnx.load_from_string(bytes(proto))
    model = _deserialize(proto, copy=True)
    if base_dir:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto, with the map types ``_deserialize`` held aside put back on their values."""
    proto = ir.to_proto(model)
    hidden = model.meta.get(HIDDEN_TYPES_KEY)
    if hidden:
        for vi in _graph_value_infos(proto.graph):
            if vi.name in hidden and not vi.HasField("type"):
                vi.type.ParseFromString(hidden[vi.name])
    return proto


def detach_initializer_inputs(model: ir.Model) -> list[str]:
    """An IR < 4 model lists every initializer as a graph input too: the format required it, and weights listed so
    are not constants a pass may rewrite. Take them off the inputs and raise the IR version to 4 (what the format
    allows since); returns the names taken off. Models of IR >= 4 are left as they are: there, an initializer
    listed as an input is a default the caller may override."""
    if model.ir_version >= 4:
        return []
    graph = model.graph
    moved = [v for v in graph.inputs if v.name in graph.initializers]
    for value in moved:
        graph.inputs.remove(value)
    model.ir_version = 4
    return [v.name for v in moved]


def clone(model: ir.Model) -> ir.Model:
    """A copy of the model's graph that shares its weights (onnx-ir's ``clone``), carrying the held-aside types."""
    new = model.clone()
    if HIDDEN_TYPES_KEY in model.meta:
        new.meta[HIDDEN_TYPES_KEY] = dict(model.meta[HIDDEN_TYPES_KEY])
    return new


def external_files(model: ir.Model) -> set[Path]:
    """The resolved paths of every external data file the model's tensors still read from."""
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor):
                files.add(Path(t.path).resolve())
    return files


def release_weights(model: ir.Model, values=None) -> list:
    """Unmap memory-mapped external weights (all, or those of ``values``); they are mapped again when next read.

    Pages a finished session touched then stop counting against the process. A buffer still exported (a live
    session, a numpy view) keeps its mapping: that tensor is skipped, and returned with the others skipped (a caller
    may try them again later, and only them).
    """
    if values is None:
        values = [v for g in model.graphs() for v in g.initializers.values()]
    kept = []
    for value in values:
        t = value.const_value if isinstance(value, ir.Value) else value
        if isinstance(t, ir.ExternalTensor):
            try:
                t.release()
            except BufferError:
                kept.append(t)
    return kept


def total_weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, force: bool = False, external_data: bool | None = None) -> Path:
    """Write ``model`` atomically; returns the path written.

    The model and its ``<name>.data`` file (when external data is used) are written into a temporary folder next to
    ``path`` and renamed into place, data first. External data is used when the model was loaded with external data,
    when ``external_data=True``, or when its weights approach protobuf's 2 GiB limit.
    """
    path = Path(path)
    target = path.resolve() if path.exists() else path.parent.resolve() / path.name
    data_name = path.name + ".data"
    data_target = target.parent / data_name
    source = model.meta.get(SOURCE_KEY)
    inputs = external_files(model)
    if source:
        inputs.add(Path(source))
    clobbers = [p for p in (target, data_target) if p in inputs]
    if clobbers and not force:
        raise UsageError(f"{path}: refusing to overwrite the input model ('{clobbers[0]}'); choose another -o or pass --force")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot create the output folder: {e.strerror}") from None
    if external_data is None:
        external_data = (bool(model.meta.get(EXTERNAL_KEY)) or bool(external_files(model))
                         or total_weight_bytes(model) > EXTERNAL_DATA_THRESHOLD)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp_model = tmpdir / path.name
        if external_data:
            _save_external(model, tmp_model, data_name)
            os.replace(tmpdir / data_name, data_target)
        else:
            onnx.save(to_proto(model), tmp_model)
        os.replace(tmp_model, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _save_external(model: ir.Model, path: Path, data_name: str) -> None:
    """``ir.save(model, path, external_data=data_name)`` through :func:`to_proto`: the weights go to the data file,
    the model is left as it was."""
    values = [v for g in model.graphs() for v in g.initializers.values()]
    tensors = [v.const_value for v in values]
    strings = [(v, t) for v, t in zip(values, tensors) if t is not None and t.dtype == ir.DataType.STRING]
    try:
        for value, _ in strings:  # onnx-ir cannot write strings to a data file: they stay in the model
            value.const_value = None
        unloaded = ir.external_data.unload_from_model(model, str(path.parent), data_name, size_threshold_bytes=256)
        for value, tensor in strings:
            value.const_value = tensor
        onnx.save(to_proto(unloaded), path)
    finally:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor


def _first_line(e: BaseException) -> str:
    """A library's (often multi-line) message folded into one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def skeleton(model: ir.Model, min_bytes: int = 1024, only: set[str] | None = None):
    """Temporarily present main-graph weights as typed graph inputs, so a proto can be made without copying them.

    Used for checking and opset conversion (a 2 GB model checks like a small one) and, with ``only``, to make a
    session whose chosen weights are fed at run time (sensitivity analysis swaps them without new sessions).
    """
    graph = model.graph
    moved: list[tuple[ir.Value, ir.TensorProtocol]] = []
    input_set = set(graph.inputs)
    order = list(graph.initializers.values())
    for value in list(graph.initializers.values()):
        t = value.const_value
        if t is None or value in input_set:
            continue
        if only is not None:
            if value.name in only:
                moved.append((value, t))
        elif isinstance(t, ir.ExternalTensor) or t.nbytes >= min_bytes:
            moved.append((value, t))
    try:
        for value, t in moved:
            graph.initializers.pop(value.name)
            value.const_value = None
            if value.type is None:
                value.type = ir.TensorType(t.dtype)
            if value.shape is None:
                value.shape = ir.Shape(list(t.shape))
            graph.inputs.append(value)
        yield [v.name for v, _ in moved]
    finally:
        for value, t in moved:
            graph.inputs.remove(value)
            value.const_value = t
        if moved:  # restore the original initializer order (it decides the saved file's layout)
            for value in list(graph.initializers.values()):
                graph.initializers.pop(value.name)
            for value in order:
                graph.register_initializer(value)


def check(model: ir.Model, full: bool = True) -> None:
    """Run onnx.checker (full check with strict shape inference) on the model's skeleton; raises ModelError."""
    with skeleton(model):
        proto = to_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"onnx.checker: {_first_line(e)}") from e
    except Exception as e:
        raise ModelError(f"onnx.checker: {_first_line(e)}") from e


def _value_infos(graph: onnx.GraphProto, out: dict[str, onnx.ValueInfoProto]) -> None:
    for vi in (*graph.value_info, *graph.output):
        out.setdefault(vi.name, vi)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _value_infos(attr.g, out)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _value_infos(g, out)


def infer_shapes(model: ir.Model) -> list[tuple[ir.Value, object, object]]:
    """Run ONNX shape inference (data propagation on) and copy inferred types/shapes onto values that lack them.

    Covers subgraph values too. Works on the skeleton, so weights are never copied. ONNX's inference stops at
    onnxruntime's contrib ops (the com.microsoft Gelu, SkipLayerNormalization, FusedMatMul, ... of an optimized
    transformer) and leaves everything after them untyped: their first output takes its first input's type (and
    shape, for the elementwise ones), and inference runs again from there. Returns what it filled in as
    (value, old type, old shape), so a pass that ends up changing nothing can undo it (``undo_inference``).
    """
    filled: list[tuple[ir.Value, object, object]] = []
    for _ in range(8):  # each round types the contrib ops that the previous round reached
        filled += _infer_round(model)
        contrib = _type_contrib_outputs(model)
        if not contrib:
            break
        filled += contrib
    return filled


# com.microsoft ops whose first output has their first input's type; the first set also keeps its shape
CONTRIB_SAME_SHAPE = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization",
                      "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "RotaryEmbedding",
                      "BiasSoftmax", "BiasDropout")
CONTRIB_SAME_TYPE = CONTRIB_SAME_SHAPE + ("FusedMatMul", "Attention", "MultiHeadAttention", "GroupQueryAttention",
                                          "MatMulNBits", "GemmFastGelu", "DecoderMaskedMultiHeadAttention")


def _type_contrib_outputs(model: ir.Model) -> list[tuple[ir.Value, object, object]]:
    filled = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "com.microsoft" or node.op_type not in CONTRIB_SAME_TYPE or not node.outputs:
            continue
        out, first = node.outputs[0], node.inputs[0] if node.inputs else None
        if out is None or out.type is not None or first is None or first.type is None:
            continue
        filled.append((out, out.type, out.shape))
        out.type = first.type
        if out.shape is None and node.op_type in CONTRIB_SAME_SHAPE and first.shape is not None:
            out.shape = ir.Shape(list(first.shape))
    return filled


def _infer_round(model: ir.Model) -> list[tuple[ir.Value, object, object]]:
    with skeleton(model):
        proto = to_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort: a model it cannot follow keeps what it has
        return []
    info: dict[str, onnx.ValueInfoProto] = {}
    _value_infos(inferred.graph, info)
    filled = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for out in node.outputs:
            vi = info.get(out.name)
            if vi is None or not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            old = (out, out.type, out.shape)
            if out.type is None and tt.elem_type:
                out.type = ir.TensorType(ir.DataType(tt.elem_type))
            if out.shape is None and tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
                out.shape = ir.Shape(dims)
            if (out.type, out.shape) != old[1:]:
                filled.append(old)
    return filled


def undo_inference(filled: list[tuple[ir.Value, object, object]]) -> None:
    for value, dtype, shape in filled:
        value.type, value.shape = dtype, shape


def upgrade_opset(model: ir.Model, version: int) -> ir.Model:
    """Raise the default-domain opset in place with onnx.version_converter, on the skeleton (weights untouched).

    The converted graph replaces ``model.graph``: every Value and Node object of the old graph is stale afterwards.
    The IR version is raised to what the opset needs (10 for opset 21, which brings int4).
    """
    current = model.opset_imports.get("", 1)
    if current >= version:
        return model
    tensors = {n: v.const_value for n, v in model.graph.initializers.items()}
    with skeleton(model) as moved:
        proto = to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as e:
        raise ModelError(f"cannot convert the model from opset {current} to {version}: {_first_line(e)}") from e
    new = _deserialize(converted)
    moved_set = set(moved)
    graph = new.graph
    for value in list(graph.inputs):
        if value.name in moved_set:
            graph.inputs.remove(value)
            value.const_value = tensors[value.name]
            graph.register_initializer(value)
    model.graph = new.graph
    model.ir_version = max(model.ir_version, new.ir_version, _IR_FOR_OPSET.get(version, 10 if version >= 21 else 7))
    return model


_IR_FOR_OPSET = {21: 10, 22: 10, 23: 11, 24: 11, 25: 12}


def model_bytes(model: ir.Model) -> bytes:
    """Serialized bytes with external tensors kept as references (for sessions and fingerprints)."""
    return to_proto(model).SerializeToString(deterministic=True)


def fingerprint(model: ir.Model) -> str:
    """A digest of the whole model, weights included (external ones read through their memory map)."""
    h = hashlib.sha256()
    with skeleton(model, min_bytes=0) as moved:  # every weight hashed by content, wherever it is stored
        h.update(to_proto(model).SerializeToString(deterministic=True))
    for name in sorted(moved):
        h.update(name.encode())
        h.update(np.ascontiguousarray(model.graph.initializers[name].const_value.numpy()).view(np.uint8).tobytes())
    return h.hexdigest()


def to_graphsurgeon(model: ir.Model):
    """Interop edge: an onnx-graphsurgeon Graph of the model (holds every weight in memory)."""
    import onnx_graphsurgeon as gs

    return gs.import_onnx(to_proto(model))


def from_graphsurgeon(graph) -> ir.Model:
    import onnx_graphsurgeon as gs

    return _deserialize(gs.export_onnx(graph))


def from_onnx_text(text: str) -> ir.Model:
    """Parse ONNX textual syntax (used by golden tests)."""
    return _deserialize(onnx.parser.parse_model(text))


def to_onnx_text(model: ir.Model, max_elements: int | None = None) -> str:
    """ONNX textual syntax; with ``max_elements``, tensors holding more elements print as
    ``["location": "<N elements>"]`` instead of every value (a 37M-parameter model is otherwise a 300 MB text)."""
    proto = to_proto(model)
    if max_elements is not None:
        for t, _ in _iter_tensors(proto.graph, ""):  # initializers and Constant tensors, subgraphs included
            count = int(np.prod(t.dims)) if len(t.dims) else 1
            if count > max_elements:
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                              "string_data", "external_data"):
                    t.ClearField(field)
                t.data_location = onnx.TensorProto.EXTERNAL
                entry = t.external_data.add()
                entry.key, entry.value = "location", f"<{count:,} elements>"
    return onnx.printer.to_text(proto)


def coerce_model(obj) -> ir.Model:
    """Accept an ir.Model, an onnx.ModelProto, serialized bytes, a path or an onnx-graphsurgeon Graph."""
    if isinstance(obj, ir.Model):
        return obj
    if isinstance(obj, onnx.ModelProto | bytes | bytearray):
        return from_proto(obj)
    if isinstance(obj, str | os.PathLike):
        return load(obj)
    if type(obj).__module__.startswith("onnx_graphsurgeon"):
        return from_graphsurgeon(obj)
    raise UsageError(f"cannot make a model from a {type(obj).__name__}; pass a path, ModelProto, ir.Model or gs.Graph")


def read_json(path: str | os.PathLike, hint: str):
    """A JSON document, or a one-line UsageError naming the file and what was expected (``hint``)."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not JSON ({type(e).__name__}); give {hint}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary file in the same folder and a rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"{path}: output folder '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result gets ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
