"""The command line: outputs, JSON, exit codes, and the bad-input corpus (one line, no traceback, no leftovers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from helpers import MODELS, embedding_lm, mlp_model
from onnx import numpy_helper

from qxc.cli import main

DIGITS = str(MODELS / "digits_mlp.onnx")


def qxc(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qxc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_compile_writes_model_and_json(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    recipe = str(MODELS.parent / "passes" / "cleanup.toml")
    assert main(["compile", DIGITS, "-o", str(out), "-p", recipe, "--json", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["pipeline"] == "fold-constants,cleanup"
    assert [p["pass"] for p in stats["passes"]] == ["fold-constants", "cleanup"]
    assert stats["before"]["nodes"] > stats["after"]["nodes"]
    assert onnx.load(out).graph.node
    b, a = stats["before"]["weight_bytes"], stats["after"]["weight_bytes"]
    assert (f"weight bytes {b:,} -> {a:,} ({a / b:.3f}x)") in capsys.readouterr().err  # the summary's size ratio


def test_compile_notes_the_weights_a_pass_left_in_float(tmp_path, capsys):
    model = tmp_path / "lm.onnx"
    onnx.save(embedding_lm(False), model)
    assert main(["compile", str(model), "-o", str(tmp_path / "q.onnx"), "-p", "int4-weights"]) == 0
    err = capsys.readouterr().err
    assert "qxc: note: pass 'quantize-weights': 1 Gather weight not quantized (Gather is not in ops)" in err
    assert main(["compile", str(model), "-o", str(tmp_path / "q.onnx"), "-p", "int4-weights", "-q"]) == 0
    assert "note" not in capsys.readouterr().err


def test_two_runs_give_identical_bytes_and_json(tmp_path):
    for tag in "ab":
        assert main(["compile", DIGITS, "-o", str(tmp_path / f"{tag}.onnx"), "-q", "--no-timings",
                     "--json", str(tmp_path / f"{tag}.json")]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    a.pop("output"), b.pop("output")
    assert a == b


def test_inspect_json_and_passes_json(capsys):
    assert main(["inspect", DIGITS, "--json", "--zip"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == [{"name": "X", "dtype": "float", "shape": [None, 64]}]
    assert info["parameters"] == 17237 and not info["quantized"]
    assert 0 < info["zip_bytes"] < info["file_bytes"]
    assert main(["passes", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert "cleanup" in listing["passes"] and "cleanup" in listing["recipes"]
    opts = {o["name"]: o for o in listing["passes"]["fold-constants"]["options"]}
    assert opts["max-elements"]["type"] == "int" and opts["max-elements"]["doc"]


def _bad_models(tmp: os.PathLike):
    """(name, path, expected exit code, text the message must contain) for each bad model in the corpus."""
    tmp = os.fspath(tmp)
    cases = []

    def add(name, data: bytes | onnx.ModelProto, code, text, extra=None):
        path = os.path.join(tmp, f"{name}.onnx")
        if isinstance(data, bytes):
            open(path, "wb").write(data)
        else:
            onnx.save(data, path)
        if extra:
            extra(path)
        cases.append((name, path, code, text))

    good = open(DIGITS, "rb").read()
    add("empty", b"", 3, "empty")
    add("truncated", good[: len(good) // 3], 3, "truncated.onnx")
    add("random", bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)), 3, "random.onnx")
    add("json", b'{"ir_version": 8, "graph": {"node": []}}', 3, "json.onnx")
    broken = mlp_model()
    broken.graph.node[1].input[0] = "nowhere"
    add("checker", broken, 3, "nowhere")
    dom = mlp_model()
    dom.graph.node[0].domain = "evil.ops"
    add("domain", dom, 3, "evil.ops")
    for v in (2, 99):
        old = mlp_model()
        old.opset_import[0].version = v
        add(f"opset{v}", old, 3, f"opset {v}")
    for tag, loc in (("dotdot", "../w.bin"), ("absolute", "/etc/hostname"), ("missing", "gone.bin")):
        m = mlp_model()
        t = m.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=loc)
        add(f"ext_{tag}", m, 3, "outside the model folder" if tag == "dotdot" else
            ("absolute" if tag == "absolute" else "missing"))
    huge = mlp_model()
    huge.graph.initializer[0].dims[:] = [1 << 20, 1 << 21]
    add("terabyte", huge, 3, "declares shape")
    return cases


def test_bad_input_corpus(tmp_path, figure):
    folder = tmp_path / "corpus"
    folder.mkdir()
    cases = _bad_models(folder)
    # model-level cases plus data/pipeline cases, all through the real console entry point
    nanm = mlp_model()
    arr = numpy_helper.to_array(nanm.graph.initializer[0]).copy()
    arr[0, 0] = np.inf
    nanm.graph.initializer[0].CopyFrom(numpy_helper.from_array(arr, "w0"))
    onnx.save(nanm, folder / "inf_weights.onnx")
    good = folder / "good.onnx"
    onnx.save(mlp_model(), good)
    np.savez(folder / "wrong_name.npz", nope=np.zeros((4, 8), np.float32))
    np.savez(folder / "wrong_shape.npz", x=np.zeros((4, 5), np.float32))
    np.savez(folder / "wrong_dtype.npz", x=np.array([["a"] * 8] * 4))
    np.savez(folder / "zero_rows.npz", x=np.zeros((0, 8), np.float32))
    runs = [(n, ["compile", p, "-o", folder / f"out_{n}.onnx"], code, text) for n, p, code, text in cases]
    runs += [
        ("data_name", ["compile", good, "-o", folder / "o1.onnx", "--data", folder / "wrong_name.npz",
                       "-p", "cleanup"], 5, "'nope' matches no model input"),
        ("data_shape", ["compile", good, "-o", folder / "o2.onnx", "--data", folder / "wrong_shape.npz"], 5,
         "expects 8 features"),
        ("data_dtype", ["compile", good, "-o", folder / "o3.onnx", "--data", folder / "wrong_dtype.npz"], 5, "dtype"),
        ("data_rows", ["compile", good, "-o", folder / "o4.onnx", "--data", folder / "zero_rows.npz"], 5, "zero rows"),
        ("data_missing", ["compile", good, "-o", folder / "o5.onnx", "--data", folder / "nothing.npz"], 5, "not found"),
        ("unknown_pass", ["compile", good, "-o", folder / "o6.onnx", "-p", "cleanup,qantize"], 2, "unknown pass"),
        ("unknown_option", ["compile", good, "-o", folder / "o7.onnx", "-p", "cleanup{fast=1}"], 2, "no option 'fast'"),
        ("overwrite_input", ["compile", good, "-o", good], 2, "refusing to overwrite"),
        ("no_file", ["inspect", folder / "absent.onnx"], 3, "no such file"),
        ("inf_weights", ["compile", folder / "inf_weights.onnx", "-o", folder / "o8.onnx", "-p", "quantize-weights"], 3,
         "tensor 'w0' holds 1 NaN/Inf"),
        ("int4_old_opset", ["compile", good, "-o", folder / "o9.onnx", "-p", "quantize-weights{bits=4,max-opset=17}"],
         2, "need opset 21 but max-opset=17"),
        ("calib_name", ["compile", good, "-o", folder / "o10.onnx", "-p", "insert-qdq", "--data",
                        folder / "wrong_name.npz"], 5, "matches no model input"),
        ("bad_ranges", ["compile", good, "-o", folder / "o11.onnx", "-p", "insert-qdq", "--ranges",
                        folder / "wrong_name.npz"], 2, "not JSON"),
        ("explain_features", ["explain", good, "--data", folder / "wrong_shape.npz"], 5, "expects 8 features"),
        ("explain_labels", ["explain", good, "--data", folder / "zero_rows.npz", "--labels"], 5, "zero rows"),
        ("report_json", ["report", folder / "wrong_name.npz", "-o", folder / "r.html"], 2, "not JSON"),
    ]
    tracebacks = 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name, args, code, text in runs:
        r = qxc(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        tracebacks += "Traceback" in r.stderr
        assert r.returncode == code, (name, r.returncode, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("qxc: error: "), (name, r.stderr)
        assert text in lines[0], (name, lines[0])
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    leftovers = sorted(set(after) - set(before))
    assert after == {k: before[k] for k in after if k in before} and not leftovers, leftovers
    figure(f"bad inputs tried: {len(runs)}; tracebacks: {tracebacks}; leftover files: {len(leftovers)}")


def test_debug_prints_the_traceback(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    r = qxc("--debug", "inspect", tmp_path / "e.onnx")
    assert r.returncode == 3 and "Traceback" in r.stderr


@pytest.mark.parametrize("argv,code", [([], 2), (["compile"], 2), (["frobnicate"], 2), (["--version"], 0)])
def test_usage_exit_codes(argv, code):
    assert main(argv) == code


@pytest.mark.parametrize("flag", ["--repeats", "--instances", "--background", "--max-depth", "--chunk-rows"])
def test_explain_counts_below_one_are_usage_errors(tmp_path, flag, capsys):
    out = tmp_path / "e.json"
    argv = ["explain", str(MODELS / "digits_mlp.onnx"), "--data", str(MODELS / "digits_test.npz"), flag, "0",
            "-o", str(out)]
    assert main(argv) == 2 and not out.exists()  # not NaN importances from zero repeats
    assert f"argument {flag}: expected a whole number >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["compile", str(MODELS / "digits_mlp.onnx"), "-o", "{tmp}/o.onnx", "-p", "cleanup"],
    ["explain", str(MODELS / "digits_mlp.onnx"), "--data", str(MODELS / "digits_test.npz"), "--method", "tree"],
    ["compare", str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.onnx"), "--data",
     str(MODELS / "digits_test.npz"), "--no-layers"],
    ["calibrate", str(MODELS / "digits_mlp.onnx"), "--data", str(MODELS / "digits_train.npz"), "-o", "{tmp}/r.json"],
    ["bench", str(MODELS / "digits_mlp.onnx"), "--runs", "3"],
])
def test_strict_provider_refuses_a_missing_provider_on_every_command(tmp_path, capsys, argv):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is installed here")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--provider", "tensorrt", "--strict-provider"]) == 2
    assert "execution provider 'tensorrt'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
    with warnings.catch_warnings():  # without the flag: CPU (with a warning where a session is opened)
        warnings.simplefilter("ignore")
        assert main([*argv, "--provider", "tensorrt"]) == 0


def test_print_after_shows_the_graph_with_large_tensors_elided(tmp_path, capsys):
    assert main(["compile", str(MODELS / "digits_mlp.onnx"), "-o", str(tmp_path / "o.onnx"), "-p",
                 "fold-constants,cleanup", "--print-after", "cleanup", "-q"]) == 0
    err = capsys.readouterr().err
    assert "// ----- after 02 cleanup" in err and "MatMul" in err
    assert '"<8,192 elements>"' in err  # the 64 x 128 weight: its size, not its values
    assert "{0,1,2,3,4,5,6,7,8,9}" in err  # the 10 class ids are small enough to print
    assert len(err) < 20_000


def test_a_reader_that_stops_early_is_not_an_internal_error(monkeypatch, capsys):
    """`qxc passes | head -1`: the pipe closes, qxc stops quietly with 141 (what a SIGPIPE death reports)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write now fails with EPIPE
    closed = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    assert main(["passes"]) == 141
    assert "error" not in capsys.readouterr().err


def test_an_output_never_replaces_another_output_or_an_input(tmp_path, capsys):
    """--json, --report, -o and --embed must not name the same file, nor an input: the later write used to replace
    the earlier one (compile's --json summary was overwritten by its report's JSON; --json MODEL destroyed the
    model). The report's JSON moves to NAME.report.json when NAME.json is taken."""
    model = tmp_path / "m.onnx"
    model.write_bytes((MODELS / "digits_mlp.onnx").read_bytes())
    before = model.read_bytes()
    out = tmp_path / "o.onnx"
    refused = [
        (["compile", model, "-o", out, "-p", "cleanup", "--json", model], "--json would overwrite the model, an input"),
        (["compile", model, "-o", out, "-p", "cleanup", "--json", out], "both -o and --json would write it"),
        (["explain", model, "--data", MODELS / "digits_test.npz", "-o", MODELS / "digits_test.npz"],
         "-o would overwrite --data, an input"),
        (["compare", model, model, "--data", MODELS / "digits_test.npz", "--json", model], "overwrite the reference"),
    ]
    for argv, message in refused:
        assert main([str(a) for a in argv]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and model.read_bytes() == before
    assert main([str(a) for a in ["compile", model, "-o", out, "-p", "cleanup", "--json", tmp_path / "r.json",
                                  "--report", tmp_path / "r.html", "-q"]]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["output"] == str(out)  # the compile summary, kept
    assert "compile" in json.loads((tmp_path / "r.report.json").read_text())  # the report's own document
    embed = ["explain", model, "--data", MODELS / "digits_test.npz", "--method", "tree", "--embed", model, "-o",
             tmp_path / "e.json"]
    assert main([str(a) for a in embed]) == 2 and model.read_bytes() == before  # a model over its input: --force
    assert main([str(a) for a in [*embed, "--force"]]) == 0 and model.read_bytes() != before
    assert main([str(a) for a in ["report", tmp_path / "r.report.json", "-o", tmp_path / "p.json"]]) == 0
    assert (tmp_path / "p.json").read_text().startswith("<!DOCTYPE html>")
    assert "compile" in json.loads((tmp_path / "p.report.json").read_text())  # not over the page


def test_a_model_onnxruntime_cannot_run_compiles_with_one_warning_instead_of_failing_its_check(tmp_path, capsys):
    """onnxruntime runs no batch-first LSTM (layout 1): the compiled model's check fails, but so does the input's,
    so the fault is no pass's. The compile writes its model with one warning (also under --verify-runtime, where
    every pass would have run the check) rather than exit 4 with advice to find the pass."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=4, layout=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 1, 4])],
                          [numpy_helper.from_array(rng.normal(size=(1, 16, 8)).astype(np.float32), "W"),
                           numpy_helper.from_array(rng.normal(size=(1, 16, 4)).astype(np.float32), "R")])
    model = tmp_path / "lstm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(4, 3, 8)).astype(np.float32))
    for extra in ([], ["--verify-runtime"]):
        out = tmp_path / f"q{len(extra)}.onnx"
        assert main(["compile", str(model), "-o", str(out), "-p", "quantize-weights{min-elements=1,ops=[LSTM]}",
                     "--data", str(tmp_path / "d.npz"), "-q", *extra]) == 0
        err = capsys.readouterr().err
        assert err.count("qxc: warning: onnxruntime cannot check the compiled model: the input model: onnxruntime "
                         "cannot load the model") == 1 and "written unchecked" in err
        assert out.exists()
