"""Assemble the report document (schema ``qxc.report/1``) and render it to one self-contained HTML page.

Document::

    {"schema": "qxc.report/1", "qxc": version, "title", "pipeline",
     "compile": {...CompileResult.to_json()...} | null,      # before/after statistics, per-pass records
     "fidelity": {...qxc compare JSON...} | null,           # outputs, accuracy, layers, first_jump, unfused
     "latency": {"before_ms", "after_ms", "batch", "threads"} | null,
     "explain": {...qxc explain JSON (qxc.explain/1)...} | null}

Every string that comes from a model (node, tensor, input names, metadata) is escaped: jinja2 autoescape for the
page, and matplotlib's SVG writer escapes the text of the plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qxc import __version__
from qxc.report import plots

SCHEMA = "qxc.report/1"


def build_report(*, title: str, compile: dict | None = None, fidelity: dict | None = None,
                 latency: dict | None = None, explain: dict | None = None, pipeline: str = "") -> dict:
    return {"schema": SCHEMA, "qxc": __version__, "title": title, "pipeline": pipeline or (
        compile or {}).get("pipeline", ""), "compile": compile, "fidelity": fidelity, "latency": latency,
            "explain": explain}


def coerce_document(doc: dict, source: str = "") -> dict:
    """A report document from a report, an explain result, a comparison (``qxc compare --json``) or compile
    statistics (``qxc compile --json``)."""
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema == SCHEMA:
        return doc
    if schema == "qxc.explain/1":
        return build_report(title=doc.get("model") or source, explain=doc)
    if isinstance(doc, dict) and "passes" in doc and "before" in doc:
        return build_report(title=doc.get("input") or source, compile=doc)
    if isinstance(doc, dict) and "outputs" in doc and "first_jump" in doc:  # qxc compare --json: the fidelity block
        return build_report(title=source, fidelity=doc)
    from qxc.errors import UsageError

    raise UsageError(f"{source}: not a qxc result (expected a report, an explain JSON, a compare JSON or compile "
                     "--json statistics)")


def _summary(report: dict) -> str:
    parts = []
    for k, v in sorted(report.items()):
        if isinstance(v, bool | int | float | str) and v not in ("", None):
            parts.append(f"{k}={v}")
    return ", ".join(parts[:8])


def _skipped(compile_doc: dict) -> list[dict]:
    rows = []
    for p in compile_doc.get("passes", []):
        rep = p.get("report", {})
        for key in ("skipped", "kept_whole", "constants_kept", "too_large", "left_float"):
            for s in rep.get(key, []) or []:
                if isinstance(s, dict):
                    what = s.get("weight") or s.get("node") or s.get("tensor") or ""
                    rows.append({"pass": p["pass"], "what": what, "reason": s.get("reason", "")})
                else:
                    rows.append({"pass": p["pass"], "what": str(s), "reason": key.replace("_", " ")})
    return rows


def _model_rows(compile_doc: dict) -> list[tuple]:
    b, a = compile_doc["before"], compile_doc["after"]
    rows = [("parameters", f"{b['parameters']:,}", f"{a['parameters']:,}"),
            ("weight bytes", f"{b['weight_bytes']:,}", f"{a['weight_bytes']:,}"),
            ("nodes", b["nodes"], a["nodes"]),
            ("opsets", ", ".join(f"{k or 'ai.onnx'}={v}" for k, v in b["opsets"].items()),
             ", ".join(f"{k or 'ai.onnx'}={v}" for k, v in a["opsets"].items())),
            ("quantized nodes", b["quantized_nodes"], a["quantized_nodes"]),
            ("subgraphs", b["subgraphs"], a["subgraphs"])]
    if "file_bytes" in compile_doc:
        rows.insert(0, ("file size (bytes)", f"{compile_doc['file_bytes'][0]:,}", f"{compile_doc['file_bytes'][1]:,}"))
    pruned = [p for p in compile_doc.get("passes", []) if p["pass"].startswith("prune")]
    if pruned:
        layers = sum(len(p.get("report", {}).get("layers", [])) for p in pruned)
        rows.append(("pruned layers", 0, layers))
    return rows


def _tree_from_nodes(nodes: list[dict], features: list[str]) -> str:
    """Draw the surrogate tree from its JSON nodes (no scikit-learn object needed)."""
    plt = plots._mpl()
    by_id = {n["id"]: n for n in nodes}
    pos, depth = {}, {}
    counter = [0]

    def layout(i, d):
        n = by_id[i]
        depth[i] = d
        if n["left"] < 0:
            pos[i] = counter[0]
            counter[0] += 1
        else:
            layout(n["left"], d + 1)
            layout(n["right"], d + 1)
            pos[i] = (pos[n["left"]] + pos[n["right"]]) / 2

    layout(0, 0)
    width = max(1, counter[0])
    maxd = max(depth.values())
    fig, ax = plt.subplots(figsize=(min(20, 1.6 * width + 1), 1.1 * (maxd + 1) + 0.5))
    for i, n in by_id.items():
        x, y = pos[i], -depth[i]
        for child in (n["left"], n["right"]):
            if child >= 0:
                ax.plot([x, pos[child]], [y, -depth[child]], color="#999", linewidth=0.8, zorder=1)
        text = (f"{n['feature']} <= {n['threshold']:.3g}\nn={n['samples']}" if n["feature"] is not None
                else f"-> {n['value'] if isinstance(n['value'], int) else round(n['value'], 3)}\nn={n['samples']}")
        ax.text(x, y, text, ha="center", va="center", fontsize=7, zorder=2,
                bbox={"boxstyle": "round", "facecolor": "#e8f0fe" if n["feature"] is not None else "#e6f4ea",
                      "edgecolor": "#888"})
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-maxd - 0.6, 0.6)
    ax.axis("off")
    ax.set_title("Surrogate tree (left branch: condition true)")
    return plots._svg(fig)


def _pixel_map(values: list[float], shape: list[int]) -> np.ndarray:
    """(height, width) of per-element values of an input of ``shape`` (…, height, width): |values| summed over the
    leading axes (the channels)."""
    grid = np.abs(np.asarray(values, np.float64)).reshape(shape)
    return grid.reshape(-1, shape[-2], shape[-1]).sum(axis=0)


def render_html(doc: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("qxc.report", "templates"),
                             autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined)
    compile_doc, fidelity, explain = doc.get("compile"), doc.get("fidelity"), doc.get("explain")
    svg: dict = {"ops": None, "layers": None, "importance": None, "importance_map": None, "shapley": None,
                 "tree": None, "local": []}
    if compile_doc:
        svg["ops"] = plots.op_histogram(compile_doc["before"]["ops"], compile_doc["after"]["ops"])
        for p in compile_doc.get("passes", []):
            p.setdefault("seconds", 0.0)
            p["summary"] = _summary(p.get("report", {}))
    if fidelity and fidelity.get("layers"):
        first = (fidelity.get("first_jump") or {}).get("tensor")
        svg["layers"] = plots.layer_sqnr(fidelity["layers"], first)
    drift, shapley_se = None, None
    if explain:
        feats = explain["features"]
        perm = explain.get("permutation")
        drift = explain.get("drift")
        if perm:
            series = {"original": [perm["values"][f] for f in feats]}
            other = (drift or {}).get("other", {}).get("permutation")
            if other:
                series["compiled"] = [other["values"][f] for f in feats]
            order = np.argsort([-abs(v) for v in series["original"]])[:20]
            svg["importance"] = plots.bars([feats[i] for i in order], {k: [v[i] for i in order]
                                                                     for k, v in series.items()},
                                           "Permutation importance (top 20)", perm["metric"] + " drop")
            shape = explain.get("input_shape") or []
            if len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1:  # an image: the importance where it lies
                maps = {f"permutation, {k}": _pixel_map(v, shape) for k, v in series.items()}
                sh = explain.get("shapley")
                if sh:
                    maps["Shapley mean |value|"] = _pixel_map([sh["mean_abs"][f] for f in feats], shape)
                svg["importance_map"] = plots.heatmaps(maps, "Importance per pixel (|values| summed over the "
                                                       "channels)", {k: "permutation" for k in maps
                                                                     if k.startswith("permutation")})
        sh = explain.get("shapley")
        if sh:
            order = np.argsort([-sh["mean_abs"][f] for f in feats])[:20]
            svg["shapley"] = plots.bars([feats[i] for i in order], {"mean |value|": [sh["mean_abs"][feats[i]]
                                                                                     for i in order]},
                                        f"Shapley values: mean |value| over {len(sh['values'])} instances (top 20)",
                                        "mean |Shapley value|")
            se = [e for row in sh.get("std_error", []) for e in row if e is not None]
            shapley_se = float(np.mean(se)) if se else None
        if explain.get("tree"):
            svg["tree"] = _tree_from_nodes(explain["tree"]["nodes"], feats)
        loc = explain.get("local")
        if loc:
            for k, row in enumerate(loc["values"][:3]):
                order = np.argsort([-abs(v) for v in row])[:12]
                inst = loc.get("instances", list(range(len(loc["values"]))))[k]
                svg["local"].append(plots.bars([feats[i] for i in order], {"contribution": [row[i] for i in order]},
                                               f"Instance {inst}: local linear contributions "
                                               f"(held-out fidelity {loc['fidelity'][k]:.3f})"))
    worst = []
    if fidelity and fidelity.get("layers"):
        def drop(e):
            d = e.get("drop_db")
            return float("inf") if d == "inf" else (float("-inf") if d in (None, "-inf") else float(d))

        worst = sorted(fidelity["layers"], key=lambda e: -drop(e))[:8]
    template = env.get_template("report.html.j2")
    return template.render(title=doc.get("title", ""), version=doc.get("qxc", __version__), schema=doc["schema"],
                           pipeline=doc.get("pipeline", ""), compile=compile_doc, fidelity=fidelity,
                           latency=doc.get("latency"), explain=explain, drift=drift, plots=svg, shapley_se=shapley_se,
                           skipped=_skipped(compile_doc) if compile_doc else [], worst_layers=worst,
                           model_rows=_model_rows(compile_doc) if compile_doc else [])


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def beside_json(html_path: str | os.PathLike, avoid=()) -> Path:
    """Where the JSON document beside an HTML page goes: the page's name with ``.json``, or ``NAME.report.json``
    where that would be the page itself or one of ``avoid`` (the command's other files: its inputs, its --json)."""
    html = Path(html_path)
    path = html.with_suffix(".json")
    taken = {Path(a).resolve() for a in avoid if a and a != "-"} | {html.resolve()}
    return html.with_name(html.stem + ".report.json") if path.resolve() in taken else path


def write_report(doc: dict, html_path: str | os.PathLike, json_path: str | os.PathLike | None = None) -> Path:
    """Write the HTML page and, beside it (or at ``json_path``), the JSON document; both atomically."""
    from qxc.ir import write_text_atomic

    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    json_path = Path(json_path) if json_path else beside_json(html_path)
    write_text_atomic(json_path, json.dumps(doc, indent=1, sort_keys=True, default=_json_default) + "\n")
    # render from the document exactly as saved (sorted keys), so `qxc report saved.json` gives the same page
    write_text_atomic(html_path, render_html(json.loads(json.dumps(doc, sort_keys=True, default=_json_default))))
    return html_path
