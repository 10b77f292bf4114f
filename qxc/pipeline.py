"""Pass registry, typed options, textual pipelines, TOML recipes and the instrumented pass manager.

A pipeline is text in the MLIR style, ``cleanup,quantize-weights{bits=4,block-size=32}``, or a TOML recipe::

    description = "int4 weights"
    [[pass]]
    name = "quantize-weights"
    bits = 4

Passes follow onnx-ir's contract (``InPlacePass``/``FunctionalPass`` returning ``PassResult``) and know nothing of
timing, verification, dumping or statistics: those are :class:`Instrument` objects the :class:`PassManager` calls.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnx_ir as ir

from qxc import ir as qir
from qxc.errors import DataError, ModelError, PassError, QxcError, UsageError
from qxc.quant.numerics import NonFiniteError
from qxc.stats import model_stats, signature

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --------------------------------------------------------------------------------------------------- options


def opt(default: Any, doc: str, **kw) -> Any:
    """A documented option field: ``bits: int = opt(8, "bit width of the integer weights")``."""
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for list defaults (options are frozen)")
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class NoOptions:
    """This pass takes no options."""


@dataclass
class PassContext:
    """What a pass may need beyond the model: sample data, execution providers, a seed."""

    data: Any = None  # qxc.data.Dataset or None
    ranges: Any = None  # qxc.calibrate.Ranges given with --ranges, or None
    providers: tuple[str, ...] = ("cpu",)
    seed: int = 0
    log: Callable[[str], None] = lambda msg: None


class QxcPass(ir.passes.InPlacePass):
    """Base of qxc's in-place passes: options instance, context and a ``report`` dict filled by ``call``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: the pass cannot run without sample data (``--data``)
    needs_data: ClassVar[bool] = False
    #: the pass keeps results bit-identical under onnxruntime (the conformance suite holds it to that)
    exact: ClassVar[bool] = False
    #: a second run changes nothing (false for passes whose target is relative to what is left)
    idempotent: ClassVar[bool] = True
    #: the result has more outputs than the input (instrument); the original outputs come first
    changes_signature: ClassVar[bool] = False

    def __init__(self, options: Any = None, context: PassContext | None = None):
        self.options = options if options is not None else self.Options()
        self.context = context or PassContext()
        self.report: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({format_step(self.name, self.options)!r})"


_REGISTRY: dict[str, type[QxcPass]] = {}


def register_pass(name: str):
    """Class decorator: make a pass available under a kebab-case name."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name '{name}' registered twice")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_passes() -> dict[str, type[QxcPass]]:
    import qxc.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[QxcPass]:
    passes = registered_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known passes: {', '.join(passes)}"
        raise UsageError(f"unknown pass '{name}'{hint} (see `qxc passes`)")
    return passes[name]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class OptionSpec:
    name: str  # kebab-case
    attr: str
    type: Any
    default: Any
    doc: str

    def type_text(self) -> str:
        return _type_text(self.type)


def _type_text(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp) if a is not type(None)) + " (optional)"
    if origin is tuple:
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def option_specs(pass_cls: type[QxcPass]) -> list[OptionSpec]:
    hints = typing.get_type_hints(pass_cls.Options)
    specs = []
    for f in dataclasses.fields(pass_cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else None
        specs.append(OptionSpec(_kebab(f.name), f.name, hints[f.name], default, f.metadata.get("doc", "")))
    return specs


def _coerce(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else ([] if value == "" else [value])
        return tuple(_coerce(v, args[0], where) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, list | tuple | dict):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{where}: unsupported option type {tp}")


def make_options(pass_cls: type[QxcPass], values: dict[str, Any]) -> Any:
    """Typed, validated options from text or TOML values; errors name the pass and the option."""
    specs = {s.name: s for s in option_specs(pass_cls)}
    kwargs = {}
    for key, value in values.items():
        spec = specs.get(_kebab(key))
        if spec is None:
            close = difflib.get_close_matches(_kebab(key), specs, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (
                f"; its options are: {', '.join(specs)}" if specs else "; it takes no options")
            raise UsageError(f"pass '{pass_cls.name}' has no option '{key}'{hint}")
        kwargs[spec.attr] = _coerce(value, spec.type, f"pass '{pass_cls.name}' option '{spec.name}'")
    try:
        return pass_cls.Options(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"pass '{pass_cls.name}': {e}") from None


# --------------------------------------------------------------------------------------------------- text form

_SPECIAL = set(',{}[]="\\\'') | {" ", "\t", "\n"}


@dataclass(frozen=True)
class Step:
    name: str
    options: Any

    def text(self) -> str:
        return format_step(self.name, self.options)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    text = repr(value) if isinstance(value, float) else str(value)
    if text == "" or any(c in _SPECIAL or c.isspace() for c in text) or text.lower() in ("none", "null"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_step(name: str, options: Any) -> str:
    parts = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        parts.append(f"{_kebab(f.name)}={_format_value(value)}")
    return name + ("{" + ",".join(parts) + "}" if parts else "")


def format_pipeline(steps: Sequence[Step]) -> str:
    return ",".join(s.text() for s in steps)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def error(self, msg: str) -> UsageError:
        return UsageError(f"pipeline text, column {self.i + 1}: {msg} in {self.text!r}")

    def ws(self):
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str):
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'")
        self.i += 1

    def bare(self) -> str:
        self.ws()
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in _SPECIAL and not self.text[self.i].isspace():
            self.i += 1
        return self.text[start : self.i]

    def value(self) -> Any:
        ch = self.peek()
        if ch == "[":
            self.i += 1
            items = []
            if self.peek() == "]":
                self.i += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("]")
                return items
        if ch in ('"', "'"):  # a quoted string (regexes with brackets, commas): double or single quotes
            self.i += 1
            out = []
            while self.i < len(self.text):
                c = self.text[self.i]
                if c == "\\" and self.i + 1 < len(self.text):
                    out.append(self.text[self.i + 1])
                    self.i += 2
                    continue
                if c == ch:
                    self.i += 1
                    return "".join(out)
                out.append(c)
                self.i += 1
            raise self.error("unterminated string")
        word = self.bare()
        if not word:
            raise self.error("expected a value")
        return word

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        result = []
        while True:
            name = self.bare()
            if not name:
                raise self.error("expected a pass name")
            opts: dict[str, Any] = {}
            if self.peek() == "{":
                self.i += 1
                if self.peek() != "}":
                    while True:
                        key = self.bare()
                        if not key:
                            raise self.error("expected an option name")
                        self.expect("=")
                        if key in opts:
                            raise self.error(f"option '{key}' given twice")
                        opts[key] = self.value()
                        if self.peek() == ",":
                            self.i += 1
                            continue
                        break
                self.expect("}")
            result.append((name, opts))
            ch = self.peek()
            if ch == "":
                return result
            self.expect(",")


def parse_pipeline(text: str) -> list[Step]:
    """Parse ``a,b{k=v,l=[x,y],s="q"}`` into typed steps; unknown passes/options are UsageErrors."""
    if not text.strip():
        raise UsageError("empty pipeline; give pass names like 'cleanup,fold-constants' or a recipe")
    steps = []
    for name, opts in _Parser(text).steps():
        cls = get_pass(name)
        steps.append(Step(name, make_options(cls, opts)))
    return steps


def recipe_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [p for p in (here.parent / "passes", here / "_recipes") if p.is_dir()]


def bundled_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for p in sorted(folder.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def load_recipe(path: str | os.PathLike) -> tuple[list[Step], str]:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read recipe: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    entries = doc.get("pass")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: a recipe needs one or more [[pass]] tables")
    steps = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not isinstance(name, str):
            raise UsageError(f"{path}: [[pass]] #{i + 1} has no name")
        try:
            steps.append(Step(name, make_options(get_pass(name), entry)))
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None
    return steps, str(doc.get("description", ""))


def resolve_pipeline(spec: str | os.PathLike | Sequence[Step]) -> list[Step]:
    """A recipe file path, a bundled recipe name, or pipeline text."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        return list(spec)
    if spec.endswith(".toml"):
        if not Path(spec).is_file():
            raise UsageError(f"{spec}: recipe file not found (bundled recipes: {', '.join(bundled_recipes())})")
        return load_recipe(spec)[0]
    recipes = bundled_recipes()
    if spec in recipes and spec not in registered_passes():
        return load_recipe(recipes[spec])[0]
    return parse_pipeline(spec)


# --------------------------------------------------------------------------------------------------- manager


class Instrument:
    """Hooks the PassManager calls around passes; passes never see instruments."""

    def before_pipeline(self, model: ir.Model) -> None: ...
    def before_pass(self, index: int, pass_: QxcPass, model: ir.Model) -> None: ...
    def after_pass(self, index: int, pass_: QxcPass, model: ir.Model, record: PassRecord) -> None: ...
    def after_pipeline(self, model: ir.Model) -> None: ...


@dataclass
class PassRecord:
    index: int
    name: str
    pipeline_text: str
    modified: bool = False
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)

    def to_json(self, timings: bool = True) -> dict[str, Any]:
        out = {"index": self.index, "pass": self.name, "spec": self.pipeline_text, "modified": self.modified,
               "report": self.report, "stats_after": self.stats, "verified": self.verified}
        if timings:
            out["seconds"] = round(self.seconds, 6)
        return out


class TimingInstrument(Instrument):
    def before_pass(self, index, pass_, model):
        self._t = time.perf_counter()

    def after_pass(self, index, pass_, model, record):
        record.seconds = time.perf_counter() - self._t


class StatisticsInstrument(Instrument):
    """Nodes by op type, parameters and bytes before the pipeline and after every pass."""

    def __init__(self):
        self.before: dict[str, Any] = {}
        self.current: dict[str, Any] = {}

    def before_pipeline(self, model):
        self.before = self.current = model_stats(model)

    def after_pass(self, index, pass_, model, record):
        if record.modified or pass_.changes_signature:  # an unmodified model has the statistics it had
            self.current = model_stats(model)
        record.stats = self.current


class VerifierInstrument(Instrument):
    """After every pass: onnx.checker full check, unchanged I/O signature, optionally an onnxruntime session (that
    runs ``sample``, one feed of the data, when given). After the pipeline, a changed model runs ``sample`` in
    onnxruntime once, as its graph optimizations leave it: a valid model that onnxruntime's fused kernels refuse
    fails the compile instead of reaching the user. Where onnxruntime cannot run the input model (``source``, its
    file) either, the failure is not the passes': the check is dropped with a warning (``warnings``)."""

    def __init__(self, runtime: bool = False, providers: Sequence[str] = ("cpu",),
                 sample: dict | None = None, source: str | os.PathLike | None = None):
        self.runtime = runtime
        self.providers = tuple(providers)
        self.sample = sample
        self.source = source
        self.warnings: list[str] = []
        self._source_failure: str | None = None  # why onnxruntime cannot run the input model ("" once it can)
        self._signature = None
        self._changed = False

    def before_pipeline(self, model):
        self._signature = signature(model)

    def _run_sample(self, model, subject: str, hint: str = "") -> None:
        """Load ``model`` in onnxruntime and run the sample: a failure is a PassError about ``subject``."""
        from qxc.runtime import make_session
        from qxc.runtime.session import run_failure

        try:
            session = make_session(model, providers=self.providers)
        except QxcError as e:  # "onnxruntime cannot load the model: ..."
            raise PassError(f"{subject}: {e}{hint}") from e
        if self.sample is not None:
            try:
                session.run(None, self.sample)
            except Exception as e:  # onnxruntime's exception types are not public; its messages are multi-line
                raise PassError(f"{subject}: onnxruntime cannot run it on the first sample: {run_failure(e)}"
                                f"{hint}") from e

    def _checked(self, model, subject: str, hint: str = "") -> bool:
        """``_run_sample``, except that where the input model fails as well the check is dropped with a warning
        (False): a model onnxruntime cannot run (an op or attribute it lacks) is no pass's doing."""
        try:
            self._run_sample(model, subject, hint)
            return True
        except PassError:
            if self.source is None:
                raise
            if self._source_failure is None:
                try:
                    self._run_sample(qir.load(self.source), "onnxruntime cannot check the compiled model: the input "
                                     "model")
                    self._source_failure = ""
                except (PassError, ModelError) as e:
                    self._source_failure = str(e)
            if not self._source_failure:
                raise
            self.runtime = False
            self.warnings.append(f"{self._source_failure}; the compiled model was written unchecked")
            return False

    def after_pipeline(self, model):
        if self._changed and self.sample is not None and not self.runtime and not self.warnings:
            # (with runtime every pass ran it; after a warning there is nothing it could tell)
            self._checked(model, "the compiled model", "; rerun with --verify-runtime to find the pass that made it")

    def after_pass(self, index, pass_, model, record):
        if not record.modified and not pass_.changes_signature:
            record.verified.append("unchanged")  # the model is the one already verified
            return
        self._changed = True
        try:
            qir.check(model)
        except ModelError as e:
            raise PassError(f"pass '{pass_.name}' produced an invalid model: {e}") from e
        record.verified.append("checker")
        sig = signature(model)
        expected = self._signature
        if pass_.changes_signature:
            sig = (sig[0], sig[1][: len(expected[1])])
        if sig != expected:
            raise PassError(f"pass '{pass_.name}' changed the model's inputs/outputs: {self._signature} -> {sig}")
        record.verified.append("signature")
        if self.runtime and self._checked(model, f"pass '{pass_.name}' produced a model that fails"):
            record.verified.append("onnxruntime")


class DumpInstrument(Instrument):
    """``--dump-dir``: the model after every pass as ``NN-pass.onnx`` (and ``00-input.onnx``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def before_pipeline(self, model):
        self.folder.mkdir(parents=True, exist_ok=True)
        qir.save(model, self.folder / "00-input.onnx", external_data=False)

    def after_pass(self, index, pass_, model, record):
        qir.save(model, self.folder / f"{index:02d}-{pass_.name}.onnx", external_data=False)


class PrintAfterInstrument(Instrument):
    """``--print-after NAME``: the ONNX text form after the named passes (or 'all'); tensors of more than
    ``max_elements`` elements print as their element count."""

    def __init__(self, names: Iterable[str], stream=None, max_elements: int = 16):
        self.names = set(names)
        self.stream = stream or sys.stderr
        self.max_elements = max_elements

    def after_pass(self, index, pass_, model, record):
        if "all" in self.names or pass_.name in self.names:
            print(f"// ----- after {index:02d} {pass_.name}", file=self.stream)
            print(qir.to_onnx_text(model, max_elements=self.max_elements), file=self.stream)


@dataclass
class CompileResult:
    model: ir.Model
    records: list[PassRecord]
    stats_before: dict[str, Any]
    stats_after: dict[str, Any]
    pipeline: str
    notes: list[str] = field(default_factory=list)  # what was done to the model besides the passes
    warnings: list[str] = field(default_factory=list)  # what the compile could not do (a check it had to drop)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records) or bool(self.notes)  # a note is a change made outside them

    def to_json(self, timings: bool = True) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "modified": self.modified, "before": self.stats_before,
                "after": self.stats_after, "passes": [r.to_json(timings) for r in self.records],
                **({"notes": self.notes} if self.notes else {}),
                **({"warnings": self.warnings} if self.warnings else {})}


class PassManager:
    """Runs steps in order with instruments around each pass.

    When a pass raises or an instrument rejects its result, the model as it then stands is saved to
    ``failure_path`` (if given) and a :class:`PassError` naming the pass is raised.
    """

    def __init__(self, steps: Sequence[Step], *, context: PassContext | None = None,
                 instruments: Sequence[Instrument] = (), failure_path: str | os.PathLike | None = None):
        self.steps = list(steps)
        self.context = context or PassContext()
        self.instruments = [TimingInstrument(), StatisticsInstrument(), *instruments]
        self.failure_path = Path(failure_path) if failure_path else None

    def run(self, model: ir.Model) -> CompileResult:
        for inst in self.instruments:
            inst.before_pipeline(model)
        stats = next(i for i in self.instruments if isinstance(i, StatisticsInstrument))
        records = []
        for index, step in enumerate(self.steps, start=1):
            cls = get_pass(step.name)
            if cls.needs_data and self.context.data is None:
                raise UsageError(f"pass '{step.name}' needs sample data; pass --data FILE")
            pass_ = cls(step.options, self.context)
            record = PassRecord(index, step.name, step.text())
            try:
                for inst in self.instruments:
                    inst.before_pass(index, pass_, model)
                result = pass_(model)
                model = result.model
                record.modified = bool(result.modified)
                record.report = pass_.report
                for inst in self.instruments:
                    inst.after_pass(index, pass_, model, record)
            except (KeyboardInterrupt, UsageError, DataError, ModelError):
                raise  # bad arguments, data or input model: nothing worth keeping
            except NonFiniteError as e:
                raise ModelError(f"pass '{step.name}': {e}") from e
            except Exception as e:
                saved = self._save_failure(model, index, step.name)
                where = f"; the model as it stood is in {saved}" if saved else ""
                if isinstance(e, PassError):
                    raise PassError(f"{e}{where}") from e
                raise PassError(f"pass '{step.name}' failed: {qir._first_line(e)}{where}") from e
            records.append(record)
        for inst in self.instruments:
            inst.after_pipeline(model)
        return CompileResult(model, records, stats.before, stats.current, format_pipeline(self.steps))

    def _save_failure(self, model: ir.Model, index: int, name: str) -> Path | None:
        if self.failure_path is None:
            return None
        out = self.failure_path.with_name(f"{self.failure_path.stem}.failed-{index:02d}-{name}.onnx")
        try:
            qir.save(model, out, force=True)
        except Exception:
            return None
        return out

