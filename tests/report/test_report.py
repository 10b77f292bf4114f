"""Reports: JSON document, self-contained HTML, escaping of model-supplied names, and a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from helpers import MODELS, mlp_model

from qxc import compile_model
from qxc import ir as qir
from qxc.cli import main
from qxc.compare import compare_models
from qxc.data import load_data
from qxc.report import SCHEMA, build_report, render_html, write_report

XSS = "<script>alert(1)</script>"


def _xss_model(tmp_path):
    m = mlp_model(sizes=(8, 16, 4))
    m.graph.node[0].name = XSS
    m.graph.node[1].output[0] = "<img src=x onerror=alert(2)>"
    m.graph.node[2].input[0] = "<img src=x onerror=alert(2)>"
    m.metadata_props.add(key="author", value="<b>bold</b>")
    path = tmp_path / "xss.onnx"
    onnx.save(m, path)
    return path


def _report_for(tmp_path, path, data_dict):
    model = qir.load(path)
    result = compile_model(qir.load(path), "insert-qdq", data=data_dict)
    data = load_data(data_dict, model)
    doc = build_report(title=path.name, compile=result.to_json(), fidelity=compare_models(model, result.model,
                                                                                        data).to_json())
    return write_report(doc, tmp_path / "report.html")


def test_model_strings_are_escaped(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    html_path = _report_for(tmp_path, _xss_model(tmp_path), {"x": x})
    html = html_path.read_text()
    assert "<script" not in html and "onerror=alert" not in html.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    import re

    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:|//)""", html)  # nothing to fetch
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["schema"] == SCHEMA and doc["compile"]["passes"][0]["pass"] == "insert-qdq"


def test_compile_report_cli_has_every_section(tmp_path):
    out = tmp_path / "r.html"
    assert main(["compile", str(MODELS / "digits_mlp.onnx"), "-o", str(tmp_path / "q.onnx"), "-p",
                 str(MODELS.parent / "passes/int8-qdq.toml"), "--data", str(MODELS / "digits_train.npz"),
                 "--eval-data", str(MODELS / "digits_test.npz"), "--report", str(out), "-q"]) == 0
    html = out.read_text()
    for anchor in ('id="model"', 'id="pipeline"', 'id="fidelity"', 'id="importance"', 'id="tree"', 'id="local"'):
        assert anchor in html
    assert html.count("<svg") >= 5
    # every quantized node fused; the Softmax that computes the probabilities is float on purpose, and said so
    assert "Every quantized compute node was fused" in html and "Kept in float on purpose" in html
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["fidelity"]["accuracy"]["candidate"] > 0.95 and doc["latency"]["after_ms"] > 0
    assert doc["explain"]["drift"]["prediction_agreement"] > 0.95
    # a saved result renders again
    assert main(["report", str(out.with_suffix(".json")), "-o", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == html


def test_report_cli_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert main(["report", str(tmp_path / "x.json"), "-o", str(tmp_path / "x.html")]) == 2
    assert not (tmp_path / "x.html").exists()


def test_report_cli_renders_a_saved_comparison(tmp_path):
    q = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz")
    qir.save(q.model, tmp_path / "q.onnx")
    assert main(["compare", str(MODELS / "digits_mlp.onnx"), str(tmp_path / "q.onnx"), "--data",
                 str(MODELS / "digits_test.npz"), "--json", str(tmp_path / "cmp.json")]) == 0
    assert main(["report", str(tmp_path / "cmp.json"), "-o", str(tmp_path / "cmp.html")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    first = json.loads((tmp_path / "cmp.json").read_text())["first_jump"]["node"]
    assert "probabilities" in page and first in page  # the outputs and the first diverging node are on the page


def test_render_is_deterministic():
    doc = build_report(title="t", explain=None)
    assert render_html(doc) == render_html(doc)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(html, tmp_path):
    """Open the page in headless Chromium: (dom, console lines, page network requests, screenshot path)."""
    exe = _chromium()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = html.resolve().as_uri()
    dom = subprocess.run([*flags, f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    net = json.loads((tmp_path / "net.json").read_text())
    start = net["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [e["params"]["url"] for e in net["events"] if e["type"] == start
                and str(e["params"].get("network_isolation_key", "")).startswith("file://")
                and not e["params"]["url"].startswith("file:")]
    return dom.stdout, console, requests, shot


def test_report_in_a_real_browser(tmp_path):
    if _chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium not installed here (apt-get install chromium); CI runs this test")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    html = _report_for(tmp_path, _xss_model(tmp_path), {"x": x})
    dom, console, requests, shot = _browse(html, tmp_path)
    assert console == [], console  # no errors, no CSP violations, no script output
    assert requests == [], requests  # no network
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>alert" not in dom  # shown as text
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[0] > 1000 and (img[..., :3] < 0.9).mean() > 0.01 and img[..., :3].std() > 0.05  # not blank


@pytest.mark.parametrize("name, method", [("diabetes_mlp", "exact"), ("digits_mlp", "kernel")])
def test_explain_report_shows_shapley_values_with_their_precision(tmp_path, name, method):
    data = MODELS / f"{name.split('_')[0]}_test.npz"
    out = tmp_path / "e.json"
    assert main(["explain", str(MODELS / f"{name}.onnx"), "--data", str(data), "--method", "shapley",
                 "--instances", "3", "-o", str(out), "--report", str(tmp_path / "e.html")]) == 0
    html = (tmp_path / "e.html").read_text()
    assert 'id="shapley"' in html and html.count("<svg") == 1 and "mean |Shapley value|" in html
    sh = json.loads(out.read_text())["shapley"]
    assert sh["method"] == method
    if method == "exact":
        assert "Exact: every coalition" in html and all(e == 0 for row in sh["std_error"] for e in row)
    else:
        assert "mean standard error of a value" in html and all(e > 0 for row in sh["std_error"] for e in row)


def test_an_image_models_importance_is_drawn_where_it_lies(tmp_path):
    """For an image input the report draws the importance per pixel (|values| summed over the channels): the
    original's and the compiled model's permutation importance on one colour scale, Shapley values on their own."""
    from qxc.report.build import _pixel_map

    values = np.arange(12.0) - 6  # a (3, 2, 2) input: three channels of 2 x 2
    np.testing.assert_array_equal(_pixel_map(values.tolist(), [3, 2, 2]),
                                  np.abs(values).reshape(3, 2, 2).sum(axis=0))
    out = tmp_path / "e.json"
    assert main(["explain", str(MODELS / "cnn_digits.onnx"), "--data", str(MODELS / "cnn_digits_test.npz"),
                 "--labels", "--method", "permutation,shapley", "--compare", str(MODELS / "cnn_digits.onnx"),
                 "-o", str(out), "--report", str(tmp_path / "e.html")]) == 0
    doc = json.loads(out.read_text())
    assert doc["input_shape"] == [1, 8, 8]
    page = (tmp_path / "e.html").read_text()
    assert "Importance per pixel" in page
    for title in ("permutation, original", "permutation, compiled", "Shapley mean |value|"):
        assert title in page
    tabular = render_html(build_report(title="t", explain={**doc, "input_shape": None}))
    assert "Importance per pixel" not in tabular
