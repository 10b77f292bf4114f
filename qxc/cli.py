"""``qxc compile | inspect | passes | compare | bench``: the command line.

Exit codes: 0 success, 1 internal error, 2 usage, 3 invalid model, 4 pass failure, 5 bad data, 130 interrupted.
Errors print one line ``qxc: error: ...``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qxc import __version__
from qxc import ir as qir
from qxc.errors import EXIT_CODES, ModelError, QxcError, UsageError


def _dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _emit_json(obj, target: str | None) -> None:
    text = _dump_json(obj)
    if target in (None, "-"):
        sys.stdout.write(text)
    else:
        qir.write_text_atomic(target, text)


_INPUTS = {"model": "the model", "reference": "the reference model", "candidate": "the candidate model",
           "models": "a model", "result": "the result", "compare": "--compare", "data": "--data",
           "eval_data": "--eval-data", "ranges": "--ranges"}
_OUTPUTS = {"output": "-o", "json": "--json", "report": "--report", "embed": "--embed"}


def _files(args, dests) -> list[tuple[str, str]]:
    """(dest, path) of every file named by these arguments (a list argument names several; '-' is a stream)."""
    out = []
    for dest in dests:
        value = getattr(args, dest, None)
        out += [(dest, v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v != "-"]
    return out


def _paths(args) -> list[str]:
    """Every file a command reads or writes, by its arguments."""
    return [v for _, v in _files(args, (*_INPUTS, *_OUTPUTS))]


def _check_paths(args) -> None:
    """No two outputs of a command share a file and no output is one of its inputs (a model written over the input
    model, compile's -o or explain's --embed, takes --force, checked where it is written): the later write would
    replace the earlier file without a word."""
    inputs: dict[Path, str] = {}
    for dest, v in _files(args, _INPUTS):
        inputs.setdefault(Path(v).resolve(), _INPUTS[dest])
    written: dict[Path, str] = {}
    for dest, v in _files(args, _OUTPUTS):
        flag, r = _OUTPUTS[dest], Path(v).resolve()
        if r in written:
            raise UsageError(f"{v}: both {written[r]} and {flag} would write it; give each its own path")
        model_out = (args.command, dest) in (("compile", "output"), ("explain", "embed"))  # a model over its input:
        if r in inputs and not (model_out and inputs[r] == "the model"):  # --force, checked where it is written
            raise UsageError(f"{v}: {flag} would overwrite {inputs[r]}, an input; choose another path")
        written[r] = flag


# --------------------------------------------------------------------------------------------------- commands


def cmd_compile(args) -> int:
    from qxc.api import compile_model
    from qxc.pipeline import DumpInstrument, PrintAfterInstrument

    if Path(args.output).resolve() == Path(args.model).resolve() and not args.force:
        raise UsageError(f"{args.output}: refusing to overwrite the input model; choose another -o or pass --force")
    model = qir.load(args.model)
    instruments = []
    if args.dump_dir:
        instruments.append(DumpInstrument(args.dump_dir))
    if args.print_after:
        instruments.append(PrintAfterInstrument(args.print_after.split(",")))
    result = compile_model(model, args.pipeline, data=args.data, verify=not args.no_verify,
                           verify_runtime=args.verify_runtime, providers=args.provider.split(","), seed=args.seed,
                           instruments=instruments, failure_path=args.output, ranges=args.ranges,
                           source=args.model)
    qir.save(result.model, args.output, force=args.force)
    summary = result.to_json(timings=not args.no_timings)
    summary["input"] = str(args.model)
    summary["output"] = str(args.output)
    if args.json:
        _emit_json(summary, args.json)
    if args.report:
        _compile_report(args, summary)
    for r in result.records:  # what a pass could not do as asked (printed even with -q)
        for w in (r.report or {}).get("warnings", []):
            print(f"qxc: warning: pass '{r.name}': {w}", file=sys.stderr)
    for w in result.warnings:
        print(f"qxc: warning: {w}", file=sys.stderr)
    for note in result.notes if not args.quiet else []:
        print(f"qxc: note: {note}", file=sys.stderr)
    if not args.quiet:
        b, a = result.stats_before, result.stats_after
        print(f"qxc: {args.model} -> {args.output}: {result.pipeline}", file=sys.stderr)
        for r in result.records:
            t = "" if args.no_timings else f" {r.seconds:8.3f}s"
            print(f"  {r.index:02d} {r.name:<18}{t} {'modified' if r.modified else 'unchanged'}", file=sys.stderr)
        ratio = f" ({a['weight_bytes'] / b['weight_bytes']:.3f}x)" if b["weight_bytes"] else ""
        print(f"  nodes {b['nodes']:,} -> {a['nodes']:,}, weight bytes {b['weight_bytes']:,} -> "
              f"{a['weight_bytes']:,}{ratio}", file=sys.stderr)
        for r in result.records:  # what a pass left alone that the user may want
            for note in (r.report or {}).get("notes", []):
                print(f"qxc: note: pass '{r.name}': {note}", file=sys.stderr)
    return 0


def _file_bytes(path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _compile_report(args, summary: dict) -> None:
    """The report of a compile: statistics, and with --data fidelity, per-layer error, latency, explanations."""
    from qxc.report import build_report, write_report
    from qxc.report.build import beside_json

    summary["file_bytes"] = [_file_bytes(args.model), _file_bytes(args.output)]
    fidelity = latency = explain = None
    if args.data:
        from qxc.compare import compare_models
        from qxc.data import load_data
        from qxc.runtime.bench import bench_models

        ref, cand = qir.load(args.model), qir.load(args.output)
        data = load_data(args.eval_data or args.data, ref)
        fidelity = compare_models(ref, cand, data.head(512)).to_json()
        b = bench_models([args.model, args.output], runs=50, data=args.data)
        latency = {"before_ms": b["models"][0]["median_ms"], "after_ms": b["models"][1]["median_ms"],
                   "batch": b["batch"], "threads": b["threads"]}
        explain = _maybe_explain(ref, cand, data, str(args.model))
    doc = build_report(title=Path(args.model).name, compile=summary, fidelity=fidelity, latency=latency,
                       explain=explain)
    write_report(doc, args.report, beside_json(args.report, _paths(args)))


REPORT_MAX_FEATURES = 256  # a compile report explains inputs up to this wide (a table, a 16 x 16 grey image)


def _maybe_explain(ref, cand, data, source: str):
    """Explanations (with drift against the compiled model) for tabular single-input models and small images;
    None otherwise (a wide input, a ResNet's 150,528 pixels, would take hours)."""
    from qxc.data import input_specs
    from qxc.explain.run import explain_model

    width = sum(math.prod(s.shape[1:]) for s in input_specs(ref)
                if s.shape is not None and all(isinstance(d, int) for d in s.shape[1:]))
    if width > REPORT_MAX_FEATURES:
        print(f"qxc: note: the report has no explanations: the input has {width:,} features per row and the "
              f"report explains at most {REPORT_MAX_FEATURES:,} (permutation importance alone would run the data "
              f"{5 * width:,} times); run `qxc explain` for them", file=sys.stderr)
        return None
    try:
        return explain_model(ref, data.head(1000), methods=("permutation", "tree", "local"),
                             use_labels=data.labels is not None, compare=cand, instances=3, source=source)
    except QxcError:
        return None


def zipped_size(path: Path) -> int:
    """Deflate-compressed size of the model file plus its external data (streamed)."""
    total = 0
    for p in [path, path.with_name(path.name + ".data")]:
        if not p.exists():
            continue
        comp = zlib.compressobj(6)
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(comp.compress(chunk))
        total += len(comp.flush())
    return total


def cmd_inspect(args) -> int:
    from qxc.stats import model_stats

    model = qir.load(args.model)
    stats = model_stats(model)
    path = Path(args.model)
    stats["file"] = str(path)
    stats["file_bytes"] = path.stat().st_size + sum(p.stat().st_size for p in qir.external_files(model))
    if args.zip:
        stats["zip_bytes"] = zipped_size(path)
    if args.json:
        _emit_json(stats, None if args.json is True else args.json)
        return 0
    print(f"{path}  ({stats['file_bytes']:,} bytes" + (f", {stats['zip_bytes']:,} zipped" if args.zip else "") + ")")
    print(f"  ir_version {stats['ir_version']}, opsets " + ", ".join(f"{d or 'ai.onnx'}={v}"
                                                                      for d, v in stats["opsets"].items()))
    for kind in ("inputs", "outputs"):
        for v in stats[kind]:
            print(f"  {kind[:-1]:<6} {v['name']}: {v['dtype']} {v['shape']}")
    print(f"  parameters {stats['parameters']:,} ({stats['weight_bytes']:,} bytes), nodes {stats['nodes']}, "
          f"subgraphs {stats['subgraphs']}, quantized: {'yes' if stats['quantized'] else 'no'}"
          + (f" ({stats['quantized_nodes']} nodes)" if stats["quantized"] else ""))
    for op, n in sorted(stats["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {n:6d}  {op}")
    return 0


def cmd_passes(args) -> int:
    from qxc.pipeline import bundled_recipes, load_recipe, option_specs, registered_passes

    passes = {}
    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        passes[name] = {"class": cls.__name__, "doc": doc, "needs_data": cls.needs_data,
                        "options": [{"name": s.name, "type": s.type_text(), "default": s.default, "doc": s.doc}
                                    for s in option_specs(cls)]}
    recipes = {}
    for name, path in bundled_recipes().items():
        steps, desc = load_recipe(path)
        recipes[name] = {"path": str(path), "description": desc, "pipeline": ",".join(s.text() for s in steps)}
    if args.json:
        _emit_json({"passes": passes, "recipes": recipes}, None)
        return 0
    for name, info in passes.items():
        print(f"{name}  ({info['class']}){'  [needs --data]' if info['needs_data'] else ''}")
        print(f"    {info['doc']}")
        for o in info["options"]:
            print(f"    {o['name']}={json.dumps(o['default'], default=str)}  <{o['type']}>  {o['doc']}")
    print("\nrecipes (-p NAME or -p passes/NAME.toml):")
    for name, info in recipes.items():
        print(f"  {name:<18} {info['pipeline']}")
        if info["description"]:
            print(f"  {'':<18} {info['description']}")
    return 0


def cmd_compare(args) -> int:
    from qxc.compare import compare_models
    from qxc.data import load_data

    providers = args.provider.split(",")
    ref = qir.load(args.reference)
    if args.backend != "local" or Path(args.data).is_dir():
        return cmd_compare_chunked(args, ref)
    if args.candidate is None:
        if len(providers) != 2:
            raise UsageError("give a candidate model, or two providers (--provider a,b) to compare one model on both")
        cand, rp, cp = ref, providers[:1], providers[1:]
    else:
        cand, rp, cp = qir.load(args.candidate), providers[:1], providers[-1:]
    data = load_data(args.data, ref)
    result = compare_models(ref, cand, data, ref_providers=rp, cand_providers=cp, layers=not args.no_layers,
                            jump_db=args.jump_db, batch_size=args.batch)
    doc = result.to_json()
    if args.json:
        _emit_json(doc, args.json)
    if args.json != "-":
        def db(x) -> str:  # "inf" / "-inf" stay words
            return x if isinstance(x, str) else f"{x:.2f}"

        for name, o in doc["outputs"].items():
            worst = o["max_abs"] if isinstance(o["max_abs"], str) else f"{o['max_abs']:.4g}"
            mismatched, nonfinite = o.get("nonfinite_mismatches"), o.get("nonfinite_reference")
            print(f"output {name}: SQNR {db(o['sqnr_db'])} dB, cosine {o['cosine']:.6f}, max abs {worst}"
                  + (f", {mismatched} infinities or NaN not matched" if mismatched else "")
                  + (f"; the reference holds {nonfinite:,} infinities or NaN of {o['elements']:,} values"
                     + (" (the figures compare none)" if nonfinite == o["elements"] else "") if nonfinite else ""))
        if doc["accuracy"]:
            print("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in doc["accuracy"].items()))
        labels = {"first_jump": "first jump", "largest_drop": "largest drop",
                  "first_nonfinite": "infinities or NaN first lost"}
        for key, label in labels.items():
            e = doc[key]
            if e:
                print(f"{label}: {e['tensor']} ({e['op']} {e['node'] or ''}) SQNR {db(e['sqnr_db'])} "
                      f"dB, drop {db(e['drop_db'])} dB")
        for u in doc["unfused"]:
            print(f"{'kept float' if u.get('expected') else 'not fused'}: {u['node']} ({u['op']}): {u['reason']}")
    return _fail_below(doc, args.fail_below)


def _fail_below(doc: dict, threshold: float | None) -> int:
    """Exit code 6 when an output's SQNR is below ``threshold`` dB ("inf"/"-inf" read as floats)."""
    if threshold is None:
        return 0
    worst = min(float(o["sqnr_db"]) for o in doc["outputs"].values())
    if worst < threshold:
        print(f"qxc: fidelity below threshold: output SQNR {worst:.2f} dB < {threshold} dB", file=sys.stderr)
        return 6
    return 0


def _backend(args, model):
    from qxc.scale import make_backend

    options = {k: getattr(args, a) for k, a in (("output", "explain_output"), ("task", "task"),
                                                ("output_name", "output_name")) if hasattr(args, a)}
    return make_backend(args.backend, model, args.provider.split(","), address=args.ray_address,
                        workers=args.workers, threads=getattr(args, "threads", None), predictor_options=options)


def _input_key(model, instead: str) -> str:
    """The single input the chunked backends read; a multi-input model is refused, saying what to do ``instead``."""
    from qxc.data import input_specs

    specs = input_specs(model)
    if len(specs) != 1:
        raise UsageError(f"the chunked backends (--backend ray, a folder of shards) take single-input models; this "
                         f"one has inputs {', '.join(s.name for s in specs)}: {instead}")
    return specs[0].name


def cmd_explain_chunked(args, model) -> int:
    """Permutation importance, Shapley values and the surrogate tree over chunks or shards, locally or on Ray."""
    import time

    from qxc.explain.importance import stability
    from qxc.explain.predictor import element_names
    from qxc.scale import (
        chunks_of,
        distributed_description,
        distributed_labels,
        distributed_permutation,
        distributed_shapley,
    )

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unsupported = [m for m in methods if m not in ("permutation", "shapley", "tree")]
    if args.perturbations and "tree" in methods:
        raise UsageError("--perturbations needs the rows in one process; with --backend ray or a folder of shards "
                         "the tree is fit on --tree-rows data rows")
    if unsupported:
        raise UsageError(f"method '{unsupported[0]}' needs the rows in one process; with --backend ray or a folder "
                         "of shards use permutation, shapley, tree")
    t0 = time.perf_counter()
    key = _input_key(model, "explain it with --backend local")  # before a Ray cluster is started for nothing
    chunks = chunks_of(args.data, key, args.chunk_rows)
    first, first_labels = chunks[0].load()
    if args.task == "auto" and args.labels:  # logits with class labels: a classifier, as in the local run
        from qxc.explain.run import class_labels

        outputs = [v for v in model.graph.outputs if v.shape is not None and len(v.shape) == 2
                   and (args.output_name is None or v.name == args.output_name)]
        width = outputs[0].shape[1] if outputs and isinstance(outputs[0].shape[1], int) else 0
        if class_labels(first_labels, width):
            args.task = "classification"
    backend = _backend(args, model)
    doc: dict = {"schema": "qxc.explain/1", "model": str(args.model)}
    if args.explain_output:
        doc["explained_output"] = args.explain_output
    try:
        item = first.shape[1:]
        first = first.reshape(len(first), -1)  # an image's elements are its features, as in the local run
        feats = element_names(key, item) if len(item) > 1 else [f"x{i}" for i in range(first.shape[1])]
        doc["features"] = feats
        if len(item) > 1:
            doc["input_shape"] = list(item)
        doc["rows"] = sum(c.stop - c.start for c in chunks)
        doc.update(distributed_description(backend))  # the task and the output, as the local run has them
        settings = {"backend": args.backend, "chunks": len(chunks), "chunk_rows": args.chunk_rows,
                    "random_state": args.seed}
        if "permutation" in methods:
            t = time.perf_counter()
            res = distributed_permutation(backend, chunks, n_repeats=args.repeats, random_state=args.seed,
                                          use_labels=args.labels)
            imp = res["importances"]
            doc["permutation"] = {"values": dict(zip(feats, np.round(imp.mean(axis=1), 8).tolist())),
                                  "std": dict(zip(feats, np.round(imp.std(axis=1), 8).tolist())),
                                  "stability": round(stability(imp.T), 6), "metric": res["metric"],
                                  "baseline_score": res["baseline_score"], "seconds": round(time.perf_counter() - t, 4),
                                  "settings": {**settings, "n_repeats": args.repeats}}
        if "shapley" in methods:
            t = time.perf_counter()
            rng = np.random.default_rng(args.seed)
            bg = first[np.sort(rng.choice(len(first), size=min(args.background, len(first)), replace=False))]
            inst = first[: args.instances]
            res = distributed_shapley(backend, inst, bg, seed=args.seed)
            doc["shapley"] = {**res.to_json(feats), "seconds": round(time.perf_counter() - t, 4),
                              "settings": {**settings, **res.settings, "instances": len(inst), "background": len(bg)}}
        if "tree" in methods:
            from qxc.explain.run import few_rows_note
            from qxc.explain.surrogates import holdout_split, tree_surrogate

            t = time.perf_counter()
            sample, rows = [], 0
            for c in chunks:  # the tree is fit on at most --tree-rows rows; the labelling is distributed
                if rows >= args.tree_rows:
                    break
                sample.append(c)
                rows += c.stop - c.start
            x = np.concatenate([c.load()[0].reshape(c.stop - c.start, -1) for c in sample])
            y = distributed_labels(backend, sample)
            classifier = y.dtype.kind != "f"  # class labels (integers or strings) or a regression's outputs
            train_rows, test_rows = holdout_split(len(x), 0.25, args.seed)
            surrogate = tree_surrogate(x[train_rows], y[train_rows], x[test_rows], y[test_rows], classifier, feats,
                                       max_depth=args.max_depth, max_leaf_nodes=args.max_leaf_nodes,
                                       random_state=args.seed, started=t,
                                       settings={**settings, "rows": len(x), "perturbations": 0, "holdout": 0.25})
            doc["tree"] = surrogate.to_json(feats)  # as the local run writes it
            note = few_rows_note(doc["tree"])
            if note:
                doc.setdefault("notes", []).append(note)
    finally:
        backend.close()
    doc["timing"] = {"seconds": round(time.perf_counter() - t0, 4)}
    if args.output:
        _emit_json(doc, args.output)
    else:
        print(_dump_json(doc), end="")
    for note in doc.get("notes", []):
        print(f"qxc: note: {note}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from qxc.scale import chunks_of, distributed_ranges

    model = qir.load(args.model)
    key = _input_key(model, "calibrate it in one process with qxc compile --data (insert-qdq{save-ranges=FILE})")
    chunks = chunks_of(args.data, key, args.chunk_rows)  # bad data is named before a Ray cluster starts
    backend = _backend(args, model)
    try:
        ranges = distributed_ranges(backend, chunks, method=args.method, keep_minmax=[v.name for v in
                                                                                      model.graph.outputs])
    finally:
        backend.close()
    ranges.settings["backend"] = args.backend
    ranges.save(args.output)
    if not args.quiet:
        print(f"qxc: {len(ranges.ranges)} tensor ranges ({args.method}, {ranges.samples} rows, "
              f"{len(chunks)} chunks, {args.backend}) -> {args.output}", file=sys.stderr)
    return 0


def cmd_explain(args) -> int:
    from qxc.data import load_data
    from qxc.explain.run import explain_model

    model = qir.load(args.model)
    if args.backend != "local" or Path(args.data).is_dir():
        return cmd_explain_chunked(args, model)
    data = load_data(args.data, model)
    if args.labels and data.labels is None:
        raise UsageError(f"{args.data}: --labels given but the data has no 'labels' array")
    compare = qir.load(args.compare) if args.compare else None
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    doc = explain_model(model, data, methods=methods, use_labels=args.labels, compare=compare,
                        providers=args.provider.split(","), seed=args.seed, repeats=args.repeats,
                        instances=args.instances, background=args.background, max_depth=args.max_depth,
                        max_leaf_nodes=args.max_leaf_nodes, perturbations=args.perturbations, baseline=args.baseline,
                        local_samples=args.local_samples,
                        source=str(args.model), threads=args.threads, output=args.explain_output, task=args.task,
                        output_name=args.output_name)
    if args.embed:
        from qxc.explain.embed import embed, linear_contributions, tree_to_onnx, verify_tree
        from qxc.explain.predictor import Predictor
        from qxc.explain.surrogates import fit_tree

        pred = Predictor(model, providers=args.provider.split(","), threads=args.threads, output=args.explain_output,
                         output_name=args.output_name,
                         task=doc["task"])  # as the explanation took it (logits with class labels: a classifier)
        if pred.input is None:
            raise UsageError(f"--embed: the surrogate reads one [rows, features] input; {args.model} has "
                             f"{pred.table_inputs.what[len('the table of '):]}")
        x = pred.table(data)
        if np.isnan(x).any():
            col = int(np.flatnonzero(np.isnan(x).any(axis=0))[0])
            raise UsageError(f"--embed: {args.data} has missing values (NaN) in feature '{doc['features'][col]}'; "
                             "the embedded surrogates are fit on complete rows: give rows without missing values")
        tree = fit_tree(pred, x, doc["features"], max_depth=args.max_depth, max_leaf_nodes=args.max_leaf_nodes,
                        perturbations=args.perturbations, random_state=args.seed)
        scores = pred.predict(x).scores
        mean, coef, r2 = linear_contributions(x.astype("float64"), scores.astype("float64"))
        exported = tree_to_onnx(tree.tree, x.shape[1], pred.is_classifier)
        mismatch = verify_tree(exported, tree.tree, x, pred.is_classifier)  # skl2onnx's export vs scikit-learn
        if mismatch:
            raise ModelError(f"the tree surrogate exported to ONNX differs from scikit-learn's by {mismatch:g} on "
                             f"{args.data}; nothing written to {args.embed}")
        added = embed(model, exported, mean, coef)
        qir.check(model)
        qir.save(model, args.embed, force=args.force)
        doc["embedded"] = {"path": str(args.embed), "outputs": added, "linear_r2": round(r2, 6),
                           "tree_fidelity": round(tree.fidelity, 6), "tree_onnx_max_diff": mismatch}
    if args.report:
        from qxc.report import build_report, write_report
        from qxc.report.build import beside_json

        write_report(build_report(title=Path(args.model).name, explain=doc), args.report,
                     beside_json(args.report, _paths(args)))
    if args.output:
        _emit_json(doc, args.output)
    elif not args.report:
        print(_dump_json(doc), end="")
    for note in doc.get("notes", []):
        print(f"qxc: note: {note}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from qxc.report import write_report
    from qxc.report.build import beside_json, coerce_document

    path = Path(args.result)
    doc = coerce_document(qir.read_json(path, "a report, explain or compile --json file"), str(path))
    write_report(doc, args.output, beside_json(args.output, _paths(args)))
    return 0


def cmd_compare_chunked(args, ref) -> int:
    from qxc.compare import unfused_nodes
    from qxc.scale import chunks_of, distributed_compare, make_backend

    if args.candidate is None:
        raise UsageError("with --backend ray or a folder of shards give a candidate model")
    cand = qir.load(args.candidate)
    key = _input_key(ref, "compare it with --backend local")
    chunks = chunks_of(args.data, key, args.chunk_rows)  # bad data is named before a Ray cluster starts
    backend = make_backend(args.backend, [ref, cand], args.provider.split(",")[:1], address=args.ray_address,
                           workers=args.workers)
    try:
        result = distributed_compare(backend, chunks, ref, cand, layers=not args.no_layers, jump_db=args.jump_db)
    finally:
        backend.close()
    result.unfused = unfused_nodes(cand)
    doc = result.to_json()
    _emit_json(doc, args.json if args.json else "-")
    return _fail_below(doc, args.fail_below)


def cmd_bench(args) -> int:
    from qxc.runtime.bench import bench_models

    doc = bench_models(args.models, batch=args.batch, providers=args.provider.split(","), threads=args.threads,
                       runs=args.runs, data=args.data)
    if args.json:
        _emit_json(doc, args.json)
    if args.json != "-":
        note = "" if doc["batch"] == args.batch else f" (asked {args.batch}; the model's or the data's batch is fixed)"
        print(f"batch {doc['batch']}{note}, {args.threads} thread(s), {args.runs} interleaved runs, providers "
              f"{doc['providers']}")
        base = doc["models"][0]["median_ms"]
        for m in doc["models"]:
            print(f"  {m['model']:<40} median {m['median_ms']:9.3f} ms  p90 {m['p90_ms']:9.3f} ms  "
                  f"{m['rows_per_s']:12.1f} rows/s  x{m['median_ms'] / base:.2f}")
    return 0


# --------------------------------------------------------------------------------------------------- parser


def _non_negative(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return value


def _count(text: str) -> int:
    """argparse type: a whole number >= 1 (0 repeats or instances would give NaN results, not an error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return value


def _scale_args(p) -> None:
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="where the chunked work runs (ray: pip install 'qxc[ray]')")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local instance)")
    p.add_argument("--workers", type=_count, help="Ray actors (default: the cluster's CPUs)")
    p.add_argument("--chunk-rows", type=_count, default=65536, help="rows per chunk")
    p.add_argument("--tree-rows", type=_count, default=200_000, help="rows the surrogate tree is fit on (chunked runs)")


_STRICT_HELP = ("fail (exit 2) when a requested provider is not available, instead of falling back to CPU with a "
                "warning")


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())
    p = argparse.ArgumentParser(prog="qxc", description="ONNX model-transformation compiler",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"qxc {__version__}")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="run a pass pipeline on a model")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")
    c.add_argument("-p", "--pipeline", default="fold-constants,cleanup",
                   help="pipeline text 'a,b{k=v}', a recipe .toml, or a bundled recipe name (default: %(default)s)")
    c.add_argument("--data", help="sample data: .npz by input name (+labels), .npy or .csv")
    c.add_argument("--ranges", help="activation ranges (JSON from insert-qdq{save-ranges=...}) instead of calibrating")
    c.add_argument("--json", help="write the compile statistics as JSON to this file ('-' for stdout)")
    c.add_argument("--report", help="write an HTML report here (and its JSON beside it); with --data it adds "
                                    "fidelity, per-layer error, latency and explanations")
    c.add_argument("--eval-data", help="held-out data for the report's fidelity and explanations (default: --data)")
    c.add_argument("--force", action="store_true", help="allow overwriting the input model")
    c.add_argument("--no-verify", action="store_true", help="skip the checker after every pass")
    c.add_argument("--verify-runtime", action="store_true", help="also open an onnxruntime session after every pass")
    c.add_argument("--dump-dir", help="save the model after every pass into this folder")
    c.add_argument("--print-after", help="print ONNX text after these passes (comma list, or 'all')")
    c.add_argument("--provider", default="cpu", help="execution providers for passes that run the model")
    c.add_argument("--strict-provider", action="store_true", help=_STRICT_HELP)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-timings", action="store_true", help="leave timings out of the JSON (for byte-stable output)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="inputs, outputs, opsets, ops, parameters, quantization")
    i.add_argument("model")
    i.add_argument("--json", nargs="?", const=True, default=False, help="JSON to stdout or to a file")
    i.add_argument("--zip", action="store_true", help="also report the deflate-compressed size")
    i.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("passes", help="list passes, their options and the bundled recipes")
    s.add_argument("--json", action="store_true")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_passes)

    m = sub.add_parser("compare", help="output and per-layer error between two models (or two providers)")
    m.add_argument("reference")
    m.add_argument("candidate", nargs="?", help="omit to compare the reference on two providers (--provider a,b)")
    m.add_argument("--data", required=True)
    m.add_argument("--json", help="write the comparison as JSON ('-' for stdout)")
    m.add_argument("--provider", default="cpu", help="provider, or 'a,b' for reference and candidate")
    m.add_argument("--strict-provider", action="store_true", help=_STRICT_HELP)
    m.add_argument("--no-layers", action="store_true", help="outputs only (no instrumentation)")
    m.add_argument("--jump-db", type=float, default=6.0, help="SQNR loss that marks the first diverging node")
    m.add_argument("--batch", type=_count, default=64)
    m.add_argument("--fail-below", type=float, help="exit 6 when an output's SQNR (dB) is below this")
    m.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _scale_args(m)
    m.set_defaults(func=cmd_compare)

    e = sub.add_parser("explain", help="feature importance, Shapley values, surrogates, drift against --compare")
    e.add_argument("model")
    e.add_argument("--data", required=True, help="tabular data (.npz with the input, labels, feature_names; or .csv)")
    e.add_argument("--labels", action="store_true", help="score permutation/ablation with the data's labels")
    e.add_argument("--method", default="permutation,ablation,shapley,tree,local",
                   help="comma list of permutation, ablation, shapley, tree, local, layers")
    e.add_argument("--compare", help="another model (e.g. the compiled one): drift of predictions and explanations")
    e.add_argument("--provider", default="cpu")
    e.add_argument("--strict-provider", action="store_true", help=_STRICT_HELP)
    e.add_argument("--threads", type=_count, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    e.add_argument("--output-name", metavar="NAME",
                   help="the model output to explain (default: a classifier's probabilities, else the first float "
                        "output; an embedding or a second head of a classifier is explained as numbers)")
    e.add_argument("--explain-output", type=int, default=0, metavar="N",
                   help="the output column of a multi-output regressor that shapley, tree and local explain "
                        "(default 0; permutation and ablation score every output)")
    e.add_argument("--task", choices=["auto", "classification", "regression"], default="auto",
                   help="auto: a label output or a probability-matrix output (Softmax) makes a classifier; "
                        "classification: the argmax of a (rows, classes) output (logits) is the label")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--repeats", type=_count, default=5)
    e.add_argument("--instances", type=_count, default=10, help="instances explained by shapley/local")
    e.add_argument("--background", type=_count, default=100, help="background rows for Shapley values")
    e.add_argument("--max-depth", type=_count, default=4, help="surrogate tree depth")
    e.add_argument("--max-leaf-nodes", type=_count, help="surrogate tree leaves at most (default: no bound)")
    e.add_argument("--perturbations", type=_non_negative, default=0, metavar="N",
                   help="also fit the tree on N in-distribution rows (a data row with one feature redrawn from its "
                        "observed values)")
    e.add_argument("--baseline", choices=["mean", "median", "zero"], default="mean",
                   help="what ablation replaces a feature by")
    e.add_argument("--local-samples", type=_count, default=1000, help="neighbourhood samples per local surrogate")
    e.add_argument("--embed", help="write the model with the surrogates merged in as extra outputs")
    e.add_argument("--force", action="store_true")
    e.add_argument("-o", "--output", help="write the JSON here (default: stdout)")
    _scale_args(e)
    e.add_argument("--report", help="also write an HTML report here")
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_explain)

    k = sub.add_parser("calibrate", help="activation ranges over chunks of data (local or Ray) for --ranges")
    k.add_argument("model")
    k.add_argument("--data", required=True, help=".npy/.npz file or a folder of shards")
    k.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy", "mse"])
    k.add_argument("-o", "--output", required=True, help="ranges JSON (use with compile --ranges)")
    k.add_argument("--provider", default="cpu")
    k.add_argument("--strict-provider", action="store_true", help=_STRICT_HELP)
    k.add_argument("-q", "--quiet", action="store_true")
    k.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _scale_args(k)
    k.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("report", help="render a saved result (report, explain, compare or compile JSON) as HTML")
    r.add_argument("result")
    r.add_argument("-o", "--output", required=True, help="the HTML page to write")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="interleaved onnxruntime latency/throughput medians of one or more models")
    b.add_argument("models", nargs="+")
    b.add_argument("--batch", type=_count, default=1)
    b.add_argument("--provider", default="cpu")
    b.add_argument("--strict-provider", action="store_true", help=_STRICT_HELP)
    b.add_argument("--threads", type=_count, default=1)
    b.add_argument("--runs", type=_count, default=100)
    b.add_argument("--data", help="take inputs from this data file (else random inputs of the declared shapes)")
    b.add_argument("--json", help="write the figures as JSON ('-' for stdout)")
    b.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    debug = getattr(args, "debug", False) or "--debug" in argv
    from qxc.runtime.progress import set_quiet

    set_quiet(getattr(args, "quiet", False))  # bars on a terminal only, and never with -q
    if not debug:  # libraries' own warnings (onnx-ir's "model is invalid but...") would break the one-line contract
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="onnx_ir")
    try:
        if getattr(args, "strict_provider", False):  # checked once: every session then gets exactly these
            from qxc.runtime import resolve_providers

            resolve_providers(args.provider, strict=True)
        _check_paths(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("qxc: interrupted; no output written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`qxc compare ... | head`): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not raise again
        return 141
    except QxcError as e:
        if debug:
            traceback.print_exc()
        print(f"qxc: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug: say so in one line
        if debug:
            traceback.print_exc()
        print(f"qxc: internal error: {type(e).__name__}: {qir._first_line(e)} (rerun with --debug and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
