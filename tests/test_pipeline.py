"""Registry, typed options, text pipelines (round trip), TOML recipes and the instrumented pass manager."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest
from helpers import mlp_model
from hypothesis import given, settings
from hypothesis import strategies as st

from qxc import compile_model
from qxc import ir as qir
from qxc.errors import PassError, UsageError
from qxc.pipeline import (
    _REGISTRY,
    DumpInstrument,
    QxcPass,
    Step,
    bundled_recipes,
    format_pipeline,
    load_recipe,
    opt,
    parse_pipeline,
    register_pass,
    registered_passes,
    resolve_pipeline,
)


@dataclass(frozen=True)
class _ToyOptions:
    bits: int = opt(8, "bit width")
    ratio: float = opt(0.5, "a ratio")
    flag: bool = opt(False, "a flag")
    mode: str = opt("a", "free text")
    names: tuple[str, ...] = opt((), "a list")


@pytest.fixture
def toy_pass():
    @register_pass("toy-pass")
    class ToyPass(QxcPass):
        """Does nothing."""

        Options = _ToyOptions

        def call(self, model):
            return ir.passes.PassResult(model, False)

    yield ToyPass
    _REGISTRY.pop("toy-pass")


def test_builtin_passes_are_registered_under_kebab_names():
    passes = registered_passes()
    assert {"cleanup", "fold-constants"} <= set(passes)
    for name, cls in passes.items():
        assert name == name.lower() and "_" not in name
        assert cls.__name__.endswith("Pass")


def test_parse_types_and_round_trips(toy_pass):
    steps = parse_pipeline('cleanup, toy-pass{bits=4,ratio=0.25,flag=true,mode="x, {y}",names=[a,"b c"]}')
    opts = steps[1].options
    assert (opts.bits, opts.ratio, opts.flag, opts.mode, opts.names) == (4, 0.25, True, "x, {y}", ("a", "b c"))
    text = format_pipeline(steps)
    assert text == 'cleanup,toy-pass{bits=4,ratio=0.25,flag=true,mode="x, {y}",names=[a,"b c"]}'
    assert parse_pipeline(text) == steps
    # single quotes too (a shell's double-quoted argument holds them without escapes)
    assert parse_pipeline("toy-pass{mode='a, [b]',names=['x',\"y's\"]}")[0].options.names == ("x", "y's")


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(-1000, 1000), ratio=st.floats(allow_nan=False, allow_infinity=False), flag=st.booleans(),
       mode=_text, names=st.lists(_text, max_size=4))
def test_text_round_trip_property(bits, ratio, flag, mode, names):
    class ToyProp(QxcPass):
        Options = _ToyOptions

        def call(self, model):
            return ir.passes.PassResult(model, False)

    register_pass("toy-prop")(ToyProp)
    try:
        steps = [Step("toy-prop", _ToyOptions(bits, ratio, flag, mode, tuple(names)))]
        assert parse_pipeline(format_pipeline(steps)) == steps
    finally:
        _REGISTRY.pop("toy-prop")


@pytest.mark.parametrize("text,match", [
    ("", "empty pipeline"),
    ("clenup", "did you mean 'cleanup'"),
    ("cleanup{dedupe=true}", "has no option 'dedupe'; did you mean 'dedup'"),
    ("cleanup{dedup=maybe}", "option 'dedup': expected true or false"),
    ("fold-constants{max-elements=0}", "max-elements must be >= 1"),
    ("fold-constants{max-elements=1.5}", "expected an integer"),
    ("cleanup{dedup=true", "expected '}'"),
    ("cleanup,,fold-constants", "expected a pass name"),
    ('cleanup{dedup="x}', "unterminated string"),
    ("cleanup{dedup=true,dedup=false}", "given twice"),
    ("quantize-weights{ops=[]}", "ops is empty"),
    ("insert-qdq{ops=[]}", "ops is empty"),
])
def test_bad_pipelines_name_the_problem(text, match):
    with pytest.raises(UsageError, match=match):
        parse_pipeline(text)


def test_recipes_load_and_bundled_names_resolve(tmp_path):
    recipes = bundled_recipes()
    assert "cleanup" in recipes
    for name, path in recipes.items():
        steps, _ = load_recipe(path)
        assert steps, name
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pass]]\nname = "cleanup"\nsort = "sometimes"\n')
    with pytest.raises(UsageError, match="bad.toml: pass 'cleanup' option 'sort'"):
        resolve_pipeline(str(bad))
    (tmp_path / "empty.toml").write_text('description = "nothing"\n')
    with pytest.raises(UsageError, match=r"needs one or more \[\[pass\]\]"):
        resolve_pipeline(str(tmp_path / "empty.toml"))


def test_manager_records_time_stats_and_verification():
    result = compile_model(qir.from_proto(mlp_model()), "fold-constants,cleanup", verify_runtime=True)
    assert [r.name for r in result.records] == ["fold-constants", "cleanup"]
    assert result.records[1].modified  # the Identity went
    assert result.records[1].report["identities"] == 1
    assert result.records[1].verified == ["checker", "signature", "onnxruntime"]
    assert result.stats_before["ops"]["Identity"] == 1 and "Identity" not in result.stats_after["ops"]
    assert all(r.seconds > 0 for r in result.records)


def test_failing_pass_saves_the_model_and_names_the_pass(tmp_path):
    @register_pass("break-graph")
    class BreakGraphPass(QxcPass):
        def call(self, model):
            node = next(iter(model.graph))
            node.replace_input_with(0, ir.Value(name="dangling"))
            return ir.passes.PassResult(model, True)

    try:
        with pytest.raises(PassError, match="pass 'break-graph' produced an invalid model.*failed-02-break-graph"):
            compile_model(qir.from_proto(mlp_model()), "cleanup,break-graph", failure_path=tmp_path / "out.onnx")
        assert (tmp_path / "out.failed-02-break-graph.onnx").exists()
    finally:
        _REGISTRY.pop("break-graph")



def test_a_compiled_model_onnxruntime_cannot_run_fails_the_compile(tmp_path):
    """A valid model whose run fails in onnxruntime (here a Gather index past the end; in the wild a fused kernel
    refusing its parameters) stops the compile when there is data: after the pipeline, or, with verify_runtime,
    after the pass that made it (its model saved). A pass that changes nothing is not run again."""

    @register_pass("index-past-end")
    class IndexPastEndPass(QxcPass):
        def call(self, model):
            out = model.graph.outputs[0]  # (rows, width): read back through a Gather with one index past the end
            name, width = out.name, out.shape[-1]
            idx = ir.Value(name="past_end", const_value=ir.tensor(np.array([*range(width - 1), width + 5],
                                                                           np.int64)))
            model.graph.register_initializer(idx)
            out.name = "pre_gather"
            gather = ir.node("Gather", [out, idx], attributes={"axis": 1}, name="gather_past_end")
            model.graph.append(gather)
            gather.outputs[0].name, gather.outputs[0].dtype, gather.outputs[0].shape = name, out.dtype, out.shape
            model.graph.outputs[0] = gather.outputs[0]
            return ir.passes.PassResult(model, True)

    data = {"x": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    try:
        with pytest.raises(PassError, match="the compiled model: onnxruntime cannot run it on the first sample: "
                                            "Gather node 'gather_past_end': .*rerun with --verify-runtime"):
            compile_model(qir.from_proto(mlp_model()), "cleanup,index-past-end", data=data)
        with pytest.raises(PassError, match="pass 'index-past-end' produced a model that fails: onnxruntime cannot "
                                            "run it on the first sample.*failed-02-index-past-end"):
            compile_model(qir.from_proto(mlp_model()), "cleanup,index-past-end", data=data, verify_runtime=True,
                          failure_path=tmp_path / "out.onnx")
        assert (tmp_path / "out.failed-02-index-past-end.onnx").exists()
        assert compile_model(qir.from_proto(mlp_model()), "cleanup", data=data).records[0].modified
    finally:
        _REGISTRY.pop("index-past-end")

def test_verifier_rejects_a_changed_signature():
    @register_pass("rename-output")
    class RenameOutputPass(QxcPass):
        def call(self, model):
            model.graph.outputs[0].name = "renamed"
            return ir.passes.PassResult(model, True)

    try:
        with pytest.raises(PassError, match="changed the model's inputs/outputs"):
            compile_model(qir.from_proto(mlp_model()), "rename-output")
    finally:
        _REGISTRY.pop("rename-output")


def test_dump_dir_holds_every_stage(tmp_path):
    compile_model(qir.from_proto(mlp_model()), "fold-constants,cleanup", instruments=[DumpInstrument(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.onnx", "01-fold-constants.onnx",
                                                          "02-cleanup.onnx"]
