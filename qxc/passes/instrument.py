"""``instrument``: a copy of the model whose extra outputs expose chosen intermediate tensors.

One mechanism serves calibration, layer-wise error (``qxc compare``) and the explanation backend's layer view.
The pass is functional: the input model is untouched (the copy shares its weights) and the result carries a
manifest mapping each extra output to its tensor, producer node, op and graph. Tensors inside ``If`` branches come
out as extra ``If`` outputs (the branch not taken yields an empty tensor, which consumers skip); tensors inside
``Loop`` bodies come out as extra scan outputs (one slice per iteration). Callers stream what they need from each
batch (min/max, histograms, error sums), so memory does not grow with the number of samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.graphs import unique_name, value_names
from qxc.pipeline import QxcPass, opt, register_pass

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class InstrumentOptions:
    ops: tuple[str, ...] = opt((), "only outputs of these op types (default: every op)")
    names: str = opt("", "only tensors whose name matches this regex")
    inputs: bool = opt(True, "also expose float graph inputs")
    subgraphs: bool = opt(True, "also expose tensors inside If branches and Loop bodies")

    def __post_init__(self):
        try:
            re.compile(self.names)
        except re.error as e:
            raise ValueError(f"names: bad regex {self.names!r}: {e}") from None


@dataclass(frozen=True)
class Tap:
    """One exposed tensor: ``output`` is the graph output to read, ``tensor`` the tensor's own name."""

    output: str
    tensor: str
    node: str | None
    op: str
    graph: str  # "main", or "<node>/<attribute>" for a subgraph
    kind: str  # "tensor" | "if-branch" | "loop-scan"

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Manifest:
    taps: list[Tap] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def by_tensor(self) -> dict[str, Tap]:
        return {t.tensor: t for t in self.taps}

    def to_json(self) -> dict:
        return {"taps": [t.to_json() for t in self.taps], "skipped": self.skipped}


def _is_float(v: ir.Value) -> bool:
    return v.dtype in FLOAT_TYPES


@register_pass("instrument")
class InstrumentPass(QxcPass):
    """Copy of the model with chosen intermediate tensors as extra outputs (functional; manifest in the report)."""

    Options = InstrumentOptions
    changes_signature = True

    @property
    def in_place(self) -> bool:
        return False

    @property
    def changes_input(self) -> bool:
        return False

    def _wanted(self, v: ir.Value, producer: ir.Node | None) -> bool:
        o = self.options
        if not v.name or not _is_float(v) or (producer is not None and producer.op_type == "Constant"):
            return False
        if o.ops and (producer is None or producer.op_type not in o.ops):
            return False
        return not o.names or re.search(o.names, v.name) is not None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        new = qir.clone(model)
        qir.infer_shapes(new)
        manifest = Manifest()
        graph = new.graph
        taken = value_names(new)
        existing = {v.name for v in graph.outputs}
        if self.options.inputs:
            init = set(graph.initializers)
            for v in graph.inputs:
                if v.name not in init and self._wanted(v, None):
                    if v.name not in existing:
                        graph.outputs.append(v)
                    manifest.taps.append(Tap(v.name, v.name, None, "graph-input", "main", "tensor"))
        for node in list(graph):
            for v in node.outputs:
                if not self._wanted(v, node):
                    continue
                if v.name not in existing:
                    graph.outputs.append(v)
                    existing.add(v.name)
                manifest.taps.append(Tap(v.name, v.name, node.name or None, node.op_type, "main", "tensor"))
            if self.options.subgraphs and node.op_type in ("If", "Loop", "Scan"):
                self._subgraph_taps(node, graph, manifest, taken)
        self.report = manifest.to_json()
        self.manifest = manifest
        return ir.passes.PassResult(new, modified=bool(manifest.taps))

    def _subgraph_taps(self, node: ir.Node, graph: ir.Graph, manifest: Manifest, taken: set[str]) -> None:
        """Add the wanted subgraph tensors as branch/body outputs, then give ``node`` matching extra outputs."""
        where = node.name or node.op_type
        if node.op_type == "Scan":
            manifest.skipped.append({"node": where, "reason": "Scan bodies are not instrumented"})
            return
        extra: list[tuple[str, ir.DataType, Tap]] = []
        if node.op_type == "If":
            then_g, else_g = node.attributes["then_branch"].value, node.attributes["else_branch"].value
            original = {id(then_g): list(then_g), id(else_g): list(else_g)}
            for branch, other, attr in ((then_g, else_g, "then_branch"), (else_g, then_g, "else_branch")):
                for inner in original[id(branch)]:
                    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                           for a in inner.attributes.values()):
                        manifest.skipped.append({"node": inner.name or inner.op_type,
                                                 "reason": "nested subgraph inside an If branch"})
                    for v in inner.outputs:
                        if not self._wanted(v, inner) or v.dtype is None:
                            continue
                        if v.shape is None or len(v.shape) == 0:
                            manifest.skipped.append({"tensor": v.name, "reason": "rank unknown or 0 inside an If branch"})
                            continue
                        rank = len(v.shape)
                        # the branch not taken yields an empty tensor of the same rank
                        empty_name = unique_name(f"{v.name}__not_taken", taken)
                        empty = ir.Node("", "Constant", [], [ir.AttrTensor(
                            "value", ir.tensor(np.zeros((0,) * rank, v.dtype.numpy()), name=empty_name))])
                        empty.outputs[0].name = empty_name
                        empty.outputs[0].type = ir.TensorType(v.dtype)
                        empty.outputs[0].shape = ir.Shape([0] * rank)
                        other.append(empty)
                        branch.outputs.append(self._copy_if_output(v, branch, taken))
                        other.outputs.append(empty.outputs[0])
                        name = unique_name(f"{v.name}__tap", taken)
                        extra.append((name, v.dtype, rank, Tap(name, v.name, inner.name or None, inner.op_type,
                                                               f"{where}/{attr}", "if-branch")))
        else:  # Loop
            body = node.attributes["body"].value
            for inner in list(body):
                for v in inner.outputs:
                    if not self._wanted(v, inner) or v.dtype is None:
                        continue
                    if v.shape is None:
                        manifest.skipped.append({"tensor": v.name, "reason": "rank unknown inside a Loop body"})
                        continue
                    body.outputs.append(self._copy_if_output(v, body, taken))
                    name = unique_name(f"{v.name}__tap", taken)
                    extra.append((name, v.dtype, len(v.shape) + 1, Tap(name, v.name, inner.name or None,
                                                                       inner.op_type, f"{where}/body", "loop-scan")))
        if extra:
            self._add_node_outputs(node, graph, [(n, d, r) for n, d, r, _ in extra])
            manifest.taps.extend(t for *_, t in extra)

    @staticmethod
    def _copy_if_output(v: ir.Value, graph: ir.Graph, taken: set[str]) -> ir.Value:
        """A value that already is a subgraph output (a carried or branch result) is tapped through an Identity."""
        if not v.is_graph_output():
            return v
        copy = ir.Node("", "Identity", [v])
        copy.outputs[0].name = unique_name(f"{v.name}__copy", taken)
        copy.outputs[0].type = ir.TensorType(v.dtype)
        copy.outputs[0].shape = v.shape
        graph.append(copy)
        return copy.outputs[0]

    @staticmethod
    def _add_node_outputs(node: ir.Node, graph: ir.Graph, outputs: list[tuple[str, ir.DataType, int]]) -> None:
        """Rebuild ``node`` with more outputs (onnx-ir fixes a node's output count) and expose them."""
        attrs = list(node.attributes.values())
        new = ir.Node(node.domain, node.op_type, list(node.inputs), attrs,
                      num_outputs=len(node.outputs) + len(outputs), name=node.name, version=node.version)
        graph.insert_before(node, new)
        for old, out in zip(node.outputs, new.outputs):
            name, dtype, shape = old.name, old.type, old.shape
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            old.name = None
            out.name, out.type, out.shape = name, dtype, shape
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
        graph.remove(node, safe=True)
        for out, (name, dtype, rank) in zip(new.outputs[len(node.outputs):], outputs):
            out.name = name
            out.type = ir.TensorType(dtype)
            out.shape = ir.Shape([None] * rank)
            graph.outputs.append(out)
