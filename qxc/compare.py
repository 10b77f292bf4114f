"""``qxc compare``: output and per-layer error between a reference model and a candidate (or two providers).

Like onnxruntime's ``qdq_loss_debug``, but one call, streaming and robust to what compilation does to names:
tensors are matched by name, and where the candidate quantizes a tensor the comparison reads its DequantizeLinear
output (what the consumers see), so a folded Relu's tensor is compared with the same tensor, not with a pre-Relu
value. Sums are float64 (an integer tensor is never subtracted in its own type), per batch, and no tensor is kept:
memory does not grow with the data. The report names the first node, in topological order, whose output loses
``jump_db`` of SQNR relative to its inputs, and the largest such drop; it also lists the compute nodes onnxruntime
left in float in the candidate (not fused into integer kernels).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.data import Dataset
from qxc.graphs import is_model_result

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool",
               "Concat", "Softmax", "Sigmoid", "MaxPool")


@dataclass
class ErrorSums:
    """Running float64 sums for SQNR, cosine and max abs error over the finite values. Infinities and NaN (an
    attention mask's -inf) agree when both models hold the same one in the same place; anywhere else they are
    counted as ``nonfinite_mismatches``, and the error is infinite. ``nonfinite`` counts the reference's own
    infinities and NaN: where every value is one, the figures compare nothing."""

    ref2: float = 0.0
    err2: float = 0.0
    dot: float = 0.0
    cand2: float = 0.0
    max_abs: float = 0.0
    count: int = 0
    nonfinite_mismatches: int = 0
    nonfinite: int = 0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape or ref.size == 0:
            return
        r = ref.astype(np.float64).reshape(-1)
        c = cand.astype(np.float64).reshape(-1)
        self.count += r.size
        finite = np.isfinite(r) & np.isfinite(c)
        if not finite.all():
            self.nonfinite += int(r.size - np.count_nonzero(np.isfinite(r)))
            same = (r == c) | (np.isnan(r) & np.isnan(c))
            self.nonfinite_mismatches += int(np.count_nonzero(~finite & ~same))
            r, c = r[finite], c[finite]
            if not r.size:
                return
        d = r - c
        self.ref2 += float(r @ r)
        self.err2 += float(d @ d)
        self.dot += float(r @ c)
        self.cand2 += float(c @ c)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    def merge(self, other: ErrorSums) -> ErrorSums:
        return ErrorSums(self.ref2 + other.ref2, self.err2 + other.err2, self.dot + other.dot,
                         self.cand2 + other.cand2, max(self.max_abs, other.max_abs), self.count + other.count,
                         self.nonfinite_mismatches + other.nonfinite_mismatches, self.nonfinite + other.nonfinite)

    @property
    def sqnr(self) -> float:
        """dB; -inf where infinities or NaN were not matched, inf where equal."""
        if self.nonfinite_mismatches:
            return float("-inf")
        if self.err2 == 0:
            return float("inf")
        if self.ref2 == 0:
            return float("-inf")
        return float(10 * np.log10(self.ref2 / self.err2))

    def to_json(self) -> dict:
        sqnr = self.sqnr
        denom = np.sqrt(self.ref2 * self.cand2)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        out = {"sqnr_db": _num(sqnr), "cosine": round(float(cosine), 8),
               "max_abs": _num(float("inf")) if self.nonfinite_mismatches else float(self.max_abs),
               "elements": self.count}
        if self.nonfinite_mismatches:
            out["nonfinite_mismatches"] = self.nonfinite_mismatches
        if self.nonfinite:
            out["nonfinite_reference"] = self.nonfinite
        return out


def _num(x: float):
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")


def dequantized_names(model: ir.Model) -> dict[str, str]:
    """For each tensor the model quantizes (QuantizeLinear input), the DequantizeLinear output its consumers read."""
    out = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "QuantizeLinear" or node.inputs[0] is None:
            continue
        for use in node.outputs[0].uses():
            if use.node.op_type == "DequantizeLinear":
                out[node.inputs[0].name] = use.node.outputs[0].name
                break
    return out


@dataclass
class Comparison:
    outputs: dict[str, dict] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    first_jump: dict | None = None
    largest_drop: dict | None = None
    first_nonfinite: dict | None = None  # the first tensor whose infinities or NaN the candidate lost (or made)
    accuracy: dict | None = None
    unfused: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"outputs": self.outputs, "accuracy": self.accuracy, "layers": self.layers,
                "first_jump": self.first_jump, "largest_drop": self.largest_drop,
                "first_nonfinite": self.first_nonfinite, "unfused": self.unfused, "settings": self.settings}


def _predictions(outs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Class predictions and which rows have one: a label output, or the argmax of a score matrix (probabilities or
    logits: top-1 agreement is what a classifier's users compare; a multi-output regressor's columns get it too,
    meaninglessly, unless its two-column targets are given). A row of scores holding NaN predicts no class (numpy's
    argmax would name the first NaN's column, and two all-NaN models would agree everywhere)."""
    for o in outs:
        if o.dtype.kind in "iuUO" and o.ndim == 1:  # class labels: integers or strings
            return o, np.ones(len(o), bool)
    for o in outs:
        if o.dtype.kind == "f" and o.ndim == 2 and o.shape[1] > 1:
            return o.argmax(axis=1), ~np.isnan(o).any(axis=1)
    return None, None


def plan(ref: ir.Model, cand: ir.Model, layers: bool) -> tuple[list[str], dict[str, str], list]:
    """Outputs to compare, the per-layer tensor mapping (reference name -> candidate name) and the topo order."""
    out_names = [v.name for v in ref.graph.outputs]
    cand_out = {v.name for v in cand.graph.outputs}
    missing = [n for n in out_names if n not in cand_out]
    if missing:
        from qxc.errors import UsageError

        raise UsageError(f"the candidate has no output '{missing[0]}'; compare models with the same outputs")
    mapping: dict[str, str] = {}
    order: list[tuple[str, ir.Node | None]] = []
    if layers:
        cand_names = {v.name for g in [cand.graph, *cand.graph.subgraphs()] for n in g for v in n.outputs}
        cand_names |= {v.name for v in cand.graph.inputs}
        deq = dequantized_names(cand)
        for v in ref.graph.inputs:
            order.append((v.name, None))
        for node in ir.traversal.RecursiveGraphIterator(ref.graph):
            for v in node.outputs:
                order.append((v.name, node))
        for name, _ in order:
            target = deq.get(name, name)
            if target in cand_names:
                mapping[name] = target
    return out_names, mapping, order


class Accumulator:
    """Sessions of both models and the running sums over the batches it is fed; states merge exactly."""

    def __init__(self, ref: ir.Model, cand: ir.Model, *, ref_providers=("cpu",), cand_providers=("cpu",),
                 layers: bool = True, threads: int | None = None):
        from qxc.calibrate.collect import TapRunner
        from qxc.runtime import make_session

        self.out_names, self.mapping, self.order = plan(ref, cand, layers)
        self.layers = layers
        self.ref_run = TapRunner(ref, list(self.mapping) or None, ref_providers) if layers else None
        self.cand_run = TapRunner(cand, list(self.mapping.values()) or None, cand_providers) if layers else None
        self.ref_sess = make_session(ref, providers=ref_providers, prepacking=False, threads=threads)
        self.cand_sess = make_session(cand, providers=cand_providers, prepacking=False, threads=threads)

    def empty(self) -> dict:
        return {"outputs": {n: ErrorSums() for n in self.out_names},
                "layers": {n: ErrorSums() for n in self.mapping}, "rows": 0, "agree": 0, "correct_ref": 0,
                "correct_cand": 0, "predicted": 0, "labeled": 0, "classed": 0}

    def update(self, state: dict, feed: dict, labels: np.ndarray | None) -> None:
        from qxc.runtime.session import normalize_output, run

        r_out = [normalize_output(a) for a in run(self.ref_sess, self.out_names, feed)]  # ZipMap: a float matrix
        c_out = [normalize_output(b) for b in run(self.cand_sess, self.out_names, feed)]
        for n, a, b in zip(self.out_names, r_out, c_out):
            if a.dtype.kind in "fiub":  # string labels are compared as predictions, below
                state["outputs"][n].update(a.astype(np.float64), b.astype(np.float64))
        # class predictions, unless the labels say regression targets (two columns)
        regression = labels is not None and np.ndim(labels) > 1
        (pr, vr), (pc, vc) = ((None, None), (None, None)) if regression else (_predictions(r_out), _predictions(c_out))
        if pr is not None and pc is not None:
            state["classed"] += len(pr)
            state["predicted"] += int(vr.sum())  # agreement is over the rows the reference predicts a class for
            state["agree"] += int(np.sum((pr == pc) & vr & vc))
            if labels is not None and len(labels) == len(pr):
                lab = np.asarray(labels).astype(pr.dtype)
                state["labeled"] += len(pr)
                state["correct_ref"] += int(np.sum((pr == lab) & vr))
                state["correct_cand"] += int(np.sum((pc == lab) & vc))
        if self.layers:
            rt, ct = self.ref_run.run(feed), self.cand_run.run(feed)
            for name, target in self.mapping.items():
                if name in rt and target in ct:
                    state["layers"][name].update(np.asarray(rt[name]), np.asarray(ct[target]))


def merge_states(states: list[dict]) -> dict:
    out = states[0]
    for st in states[1:]:  # in chunk order
        for key in ("outputs", "layers"):
            for n, s in st[key].items():
                out[key][n] = out[key][n].merge(s)
        for key in ("rows", "agree", "correct_ref", "correct_cand", "predicted", "labeled", "classed"):
            out[key] += st[key]
    return out


def finish(state: dict, order, mapping, *, layers: bool, jump_db: float, settings: dict) -> Comparison:
    result = Comparison(settings=settings)
    result.outputs = {n: s.to_json() for n, s in state["outputs"].items() if s.count}  # numbers, not labels
    if state["predicted"]:
        result.accuracy = {"agreement": state["agree"] / state["predicted"]}
        if state["labeled"] == state["classed"]:
            result.accuracy.update({"reference": state["correct_ref"] / state["labeled"],
                                    "candidate": state["correct_cand"] / state["labeled"]})
    if layers:
        _layer_report(result, order, mapping, state["layers"], jump_db)
    return result


def compare_models(ref: ir.Model, cand: ir.Model, data: Dataset, *, ref_providers: Sequence[str] = ("cpu",),
                   cand_providers: Sequence[str] = ("cpu",), layers: bool = True, jump_db: float = 6.0,
                   batch_size: int = 64) -> Comparison:
    acc = Accumulator(ref, cand, ref_providers=ref_providers, cand_providers=cand_providers, layers=layers)
    state = acc.empty()
    labels = data.labels
    start = 0
    from qxc.data import input_specs

    fixed = [s.shape[0] for m in (ref, cand) for s in input_specs(m) if s.shape and isinstance(s.shape[0], int)]
    if fixed:  # a model exported without a dynamic batch axis runs that many rows at a time
        batch_size = min(batch_size, *fixed)
    from qxc.runtime.progress import progress

    batches = -(-len(data) // batch_size) if data.stacked is not None else len(data)
    for feed in progress(data.batches(batch_size), total=batches, desc="comparing"):
        n = len(next(iter(feed.values()))) if data.stacked is not None else 1
        state["rows"] += n
        acc.update(state, feed, None if labels is None else np.asarray(labels)[start : start + n])
        start += n
    settings = {"jump_db": jump_db, "batch_size": batch_size, "rows": len(data),
                "ref_providers": list(ref_providers), "cand_providers": list(cand_providers)}
    result = finish(state, acc.order, acc.mapping, layers=layers, jump_db=jump_db, settings=settings)
    result.unfused = unfused_nodes(cand, cand_providers)
    return result


def _layer_report(result: Comparison, order, mapping, sums, jump_db: float) -> None:
    """Per tensor: SQNR, its inputs' worst SQNR and the drop between them (inputs not compared count as exact)."""
    sqnr: dict[str, float] = {}
    best_drop = -np.inf  # ranks finite drops; infinite ones rank lowest
    for name, node in order:
        if name not in mapping or sums[name].count == 0:
            continue
        stats = sums[name].to_json()
        s = sqnr[name] = sums[name].sqnr
        inputs = [sqnr[v.name] for v in (node.inputs if node is not None else []) if v is not None and v.name in sqnr]
        in_sqnr = min(inputs) if inputs else np.inf
        drop = 0.0 if not np.isfinite(s) and s > 0 else (in_sqnr - s)
        entry = {"tensor": name, "compared_with": mapping[name], "node": node.name if node is not None else None,
                 "op": node.op_type if node is not None else "graph-input", **stats,
                 "input_sqnr_db": _num(in_sqnr), "drop_db": _num(drop)}
        result.layers.append(entry)
        if result.first_nonfinite is None and sums[name].nonfinite_mismatches:
            result.first_nonfinite = entry  # an attention mask's -inf rounded to a finite value, say
        if node is None:
            continue  # a graph input is where error can start, not a node where it jumps
        if result.first_jump is None and drop >= jump_db:
            result.first_jump = entry
        # the largest finite drop (an infinite one only marks error appearing after exact inputs)
        rank = drop if np.isfinite(drop) else -1.0
        if rank > best_drop or result.largest_drop is None:
            best_drop, result.largest_drop = rank, entry


def unfused_nodes(model: ir.Model, providers: Sequence[str] = ("cpu",)) -> list[dict]:
    """Compute nodes that onnxruntime's optimized candidate still runs in float between DequantizeLinear nodes."""
    if not any(n.op_type == "DequantizeLinear" for n in ir.traversal.RecursiveGraphIterator(model.graph)):
        return []
    import onnxruntime as ort

    from qxc.runtime.session import resolve_providers, session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimization="all")
        path = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(path)
        folders = {str(p.parent) for p in qir.external_files(model)}
        if folders:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folders.pop())
        try:
            ort.InferenceSession(qir.model_bytes(model), so, providers=resolve_providers(providers))
            optimized = qir.load(path)
        except Exception:
            return []
    out = []
    for node in ir.traversal.RecursiveGraphIterator(optimized.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in COMPUTE_OPS:
            continue
        fed = [v.producer().op_type for v in node.inputs if v is not None and v.producer() is not None]
        if "DequantizeLinear" not in fed:
            continue
        if any(is_model_result(v) for v in node.outputs):  # insert-qdq leaves the model's results in float
            out.append({"node": node.name, "op": node.op_type, "expected": True,
                        "reason": "computes a model output, kept float on purpose (insert-qdq{quantize-outputs=true} "
                                  "would round it to 8 bits)"})
        elif any(op not in ("DequantizeLinear", "Constant") for op in fed) and not any(
                u.node.op_type == "QuantizeLinear" for v in node.outputs if v is not None for u in v.uses()):
            out.append({"node": node.name, "op": node.op_type, "expected": True,
                        "reason": "also reads a tensor insert-qdq left float (an attention mask's -inf, say: its "
                                  "report says why), so no integer kernel applies"})
        else:
            out.append({"node": node.name, "op": node.op_type, "expected": False,
                        "reason": "runs in float between DequantizeLinear/QuantizeLinear (no integer kernel fused)"})
    return out
