"""Fuzzers: whatever a spec, a ``graft()`` call or a ``--set`` override holds, only a GraftError comes out.

Each fuzzer feeds generated, mostly wrong, input to one entry point that takes untrusted input and asserts that
it either works or raises a :class:`graftnet.GraftError` subclass (a named error with a message), never a raw
exception with a traceback (``SystemExit`` from argparse for an unknown flag is fine):

* :func:`graftnet.load_spec` on mutated valid specs, on arbitrary JSON-like values, and on spec files of raw text
  and bytes (YAML fragments, anchors and aliases, broken UTF-8);
* :func:`graftnet.graft` on small built-in models (``graftnet:mlp``, ``graftnet:cnn1d``, ``graftnet:convnet``)
  with generated teachers, sites and taps (real activation names, mutated), adapters, input adapters with random
  kwargs and mixing values; a graft that builds must also run forward in both modes;
* ``graftnet check SPEC --set KEY=VALUE …`` with generated keys (real spec paths, mutated) and YAML values.

The default run is bounded (a few dozen examples each, the file well under a minute). For a longer run::

    GRAFTNET_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py -p no:cacheprovider

and with ``GRAFTNET_FUZZ_RECORD=DIR`` each fuzzer records every outcome (``ok``, ``named``, ``raw``) in
``DIR/<fuzzer>.jsonl`` instead of failing on the first raw exception, to count them; the examples are then
derandomized, the same on every run, so that counts before and after a change compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graftnet import GraftError, graft, load_spec
from graftnet.cli import main

EXAMPLES = int(os.environ.get("GRAFTNET_FUZZ_EXAMPLES", "0"))
RECORD = os.environ.get("GRAFTNET_FUZZ_RECORD")


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        database=None,
        derandomize=RECORD is not None,  # counting: the same examples on every run, so before/after compare
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def only_named_errors(fuzzer: str, call: Callable[[], object], *, exits: bool = False) -> None:
    """Run ``call``: it may succeed or raise a GraftError (or SystemExit with ``exits``); anything else fails.

    With GRAFTNET_FUZZ_RECORD set, the outcome is recorded instead and nothing fails.
    """
    outcome, detail = "ok", ""
    try:
        call()
    except GraftError as e:
        outcome, detail = "named", f"{type(e).__name__}: {str(e)[:120]}"
    except SystemExit as e:
        if not exits:
            raise
        outcome, detail = "named", f"SystemExit({e.code})"
    except Exception as e:  # what the fuzzer hunts: anything that is not a named error
        if RECORD is None:
            raise
        outcome, detail = "raw", f"{type(e).__name__}: {str(e)[:200]}"
    if RECORD is not None:
        path = Path(RECORD) / f"{fuzzer}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"outcome": outcome, "detail": detail}) + "\n")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# --- values ---------------------------------------------------------------------------------------------------

EDGE_INTS = [-1, 0, 1, 2, 3, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]
WORDS = ["", " ", "class", "None", "training", "to", "forward", "keys", "_modules", "t", "x", "ﬁ", "a.b", "1x",
         "auto", "identity", "linear", "conv1x1", "resize", "normalize", "uniform", "digits",
         "graftnet:mlp"]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGE_INTS)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(EDGE_FLOATS)
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(WORDS), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip

# --- load_spec --------------------------------------------------------------------------------------------------

MLP = {"model": "graftnet:mlp", "kwargs": {"in_features": 8, "hidden": [4, 4], "num_classes": 3}}
VALID_SPEC: dict[str, Any] = {
    "student": MLP,
    "teachers": {"t": {**MLP, "input": [{"adapter": "identity", "kwargs": {}}]}},
    "input_shape": [8],
    "sites": [{"student": "body.2", "taps": ["t:body.2"], "adapter": "auto"}],
    "adapter": "auto",
    "mixing": {"init": 0.5, "rescale_taps": True, "calibration_batches": 2},
    "data": {"dataset": "digits", "kwargs": {}, "classes": [0, 1, 2], "label_map": {0: 0, 1: 1, 2: 2},
             "train_size": 40, "val_size": 20, "seed": 0, "batch_size": 8},
    "train": {"method": "kd", "epochs": 1, "lr": 0.01, "seed": 0, "kd": {"teacher": "t"},
              "lambda1": {"final": 1.0, "start": 0.1, "end": 0.5}, "ban": {"generations": 2}},
}  # fmt: skip
FIELD_NAMES = sorted({"model", "kwargs", "weights", "input", "adapter", "student", "taps", "teachers", "sites",
                      "init", "seed", "epochs", "method", "label_map", "classes", "dataset", "generations", "kd",
                      "teacher", "input_shape", "rl", "env", "train", "data", "mixing", "lr", "ban"})  # fmt: skip


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``node`` (dict keys and list indices), the root included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """``base`` with 1–4 random edits: a value replaced, a key dropped, renamed or added, a list entry appended."""
    spec = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(paths(spec))))
        op = draw(st.sampled_from(["replace", "drop", "rename", "add"]))
        if not path:
            if op == "replace":
                return draw(json_values)
            continue
        parent, key = at(spec, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = draw(json_values)
        elif op == "drop":
            del parent[key]
        elif isinstance(parent, dict) and op == "rename":
            parent[draw(st.text(max_size=8) | st.sampled_from(FIELD_NAMES))] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return spec


@fuzz_settings(150)
@given(mutated(VALID_SPEC))
def test_load_spec_on_mutated_specs(spec: Any) -> None:
    only_named_errors("load_spec_mutated", lambda: load_spec(spec))


@fuzz_settings(100)
@given(json_values)
def test_load_spec_on_arbitrary_values(value: Any) -> None:
    only_named_errors("load_spec_values", lambda: load_spec(value))


YAML_FRAGMENTS = ["student:", " model: graftnet:mlp", "teachers:", "  t: {model: 'graftnet:mlp'}", "sites:",
                  "- {student: body.2, taps: ['t:body.2']}", "input_shape: [8]", "train: {seed: ", "}", "]", "[", "{",
                  ": ", "- ", "\n", "  ", "&a ", "*a", "&b [*a, *a, *a]", "<<: *a", "!!python/object:os.system",
                  "!!binary aGk=", "!!set {a, b}", "? [1]\n: 2", "2001-02-30", "1e999", "0x1F", "'", '"', "#", "---",
                  "...", "%YAML 1.1", "9" * 5000, "\t", "\x00", "\ufeff", "é", "\\", "|", ">"]  # fmt: skip
raw_text = st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=10), max_size=12).map("".join)
raw_bytes = st.binary(max_size=60) | raw_text.map(lambda t: t.encode("utf-8") + b"\xe9\xff")


@fuzz_settings(150)
@given(raw_text.map(str.encode) | raw_bytes, st.sampled_from([".yaml", ".yml", ".json", ".txt"]))
def test_load_spec_on_raw_files(workdir: Path, content: bytes, suffix: str) -> None:
    path = workdir / f"spec{suffix}"
    path.write_bytes(content)
    only_named_errors("load_spec_files", lambda: load_spec(path))


# --- graft() ----------------------------------------------------------------------------------------------------

# Small models and their real activation names: what mutated names start from.
MODELS: dict[str, tuple[dict[str, Any], list[int], list[str]]] = {
    "graftnet:mlp": ({"in_features": 8, "hidden": [4, 4], "num_classes": 3}, [8], ["body.2", "body.4", "body"]),
    "graftnet:cnn1d": (
        {"in_channels": 1, "channels": [4, 4], "length": 16, "kernel_size": 3, "num_classes": 3},
        [1, 16],
        ["features.act1", "features.act2", "features", "features.conv1"],
    ),
    "graftnet:convnet": (
        {"in_channels": 1, "channels": [4, 4], "image_size": 8, "num_classes": 3},
        [1, 8, 8],
        ["features.act1", "features.act2", "features", "head"],
    ),
}
TEACHER_NAMES = ["t", "u", "teacher_1", "class", "None", "training", "to", "forward", "keys", "cuda", "_modules",
                 "ﬁ", "a-b", "", "T"]  # fmt: skip
INPUT_KWARGS = ["size", "mode", "mean", "std", "out_channels"]
INPUT_VALUES = [[8], [8, 8], [16], [4, 4, 4], [0], [-1], [0.5], [0.5, 0.5], [1.0], [0.0], 1, 3, 0, -2, "bilinear",
                "nearest", "area", "linear", "trilinear", "bicubic", "cubic", [10**6, 10**6]]  # fmt: skip


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 8) -> st.SearchStrategy[Any]:
    """``good`` ``odds`` times out of ``odds + 1``, else ``bad``: specs with one or two mistakes, not ten."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: good if ok else bad)


@st.composite
def names(draw: st.DrawFn, real: list[str]) -> str:
    """A real activation name (most often), or one mutated: cut, extended, suffixed with a call index, replaced."""
    name = draw(st.sampled_from(real))
    how = draw(mostly(st.just("keep"), st.sampled_from(["cut", "extend", "call", "text", "word"]), odds=5))
    if how == "cut":
        return name[: draw(st.integers(0, len(name)))]
    if how == "extend":
        return name + draw(st.sampled_from([".0", ".act", "1", ".", "..x", " ", "@"]))
    if how == "call":
        return f"{name}@{draw(st.integers(-1, 3))}"
    if how == "text":
        return draw(st.text(max_size=10))
    if how == "word":
        return draw(st.sampled_from(WORDS))
    return name


@st.composite
def input_steps(draw: st.DrawFn) -> list[dict[str, Any]]:
    steps = []
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        keys = draw(st.lists(mostly(st.sampled_from(INPUT_KWARGS), st.text(max_size=5)), max_size=3, unique=True))
        kwargs = {k: draw(mostly(st.sampled_from(INPUT_VALUES), json_values, odds=3)) for k in keys}
        adapter = draw(mostly(st.sampled_from(["identity", "resize", "normalize", "conv1x1"]), st.text(max_size=6)))
        steps.append({"adapter": adapter, "kwargs": kwargs})
    return steps


@st.composite
def taps_of(draw: st.DrawFn, teachers: list[str], acts: dict[str, list[str]]) -> str:
    """``teacher:name``: one of ``teachers`` (or one not given) and one of its activation names, maybe mutated."""
    teacher = draw(mostly(st.sampled_from(teachers), st.just("nobody")) if teachers else st.just("nobody"))
    return f"{teacher}:{draw(names(acts.get(teacher, ['x'])))}"


@st.composite
def graft_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A spec over the small models: teachers (often of the student's kind), sites, taps, adapters, mixing."""
    student_ref = draw(st.sampled_from(sorted(MODELS)))
    kwargs, shape, student_acts = MODELS[student_ref]
    teachers: dict[str, Any] = {}
    acts: dict[str, list[str]] = {}
    teacher_names = mostly(st.sampled_from(["t", "u", "t2"]), st.sampled_from(TEACHER_NAMES) | st.text(max_size=6))
    for name in draw(st.lists(teacher_names, min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=2, unique=True)):
        ref = draw(st.sampled_from([student_ref, student_ref, *sorted(MODELS)]))
        t_kwargs, _, t_acts = MODELS[ref]
        teachers[name] = {"model": ref, "kwargs": t_kwargs, "input": draw(input_steps())}
        acts[name] = t_acts
    sites = []
    site_names = st.lists(names(student_acts), max_size=3, unique=True)
    for student in draw(mostly(site_names.filter(bool), site_names, odds=4)):
        tap_names = taps_of(sorted(teachers), acts)
        taps = draw(mostly(st.lists(tap_names, min_size=1, max_size=2, unique=True), st.lists(tap_names, max_size=2)))
        site: dict[str, Any] = {"student": student, "taps": taps}
        if draw(st.booleans()):
            adapters = st.sampled_from(["auto", "identity", "linear", "conv1x1"])
            site["adapter"] = draw(mostly(adapters, st.text(max_size=5)))
        sites.append(site)
    spec: dict[str, Any] = {"student": {"model": student_ref, "kwargs": kwargs}, "teachers": teachers, "sites": sites}
    spec["input_shape"] = draw(mostly(
        st.just(shape),
        st.sampled_from([[10**6, 10**6], [2**40], [1, 2**16, 2**16]]) | st.lists(st.integers(-1, 12), max_size=4),
    ))  # fmt: skip
    if draw(st.booleans()):
        init = draw(mostly(st.sampled_from(["uniform", 0.5, 0.999, 1e-9]),
                           st.sampled_from([0.0, 1.0, math.nan]) | st.floats() | st.text(max_size=4), odds=3))
        spec["mixing"] = {"init": init, "rescale_taps": draw(st.booleans()),
                          "calibration_batches": draw(mostly(st.integers(1, 3), st.integers(-1, 0)))}  # fmt: skip
    return spec


def example_inputs(shape: list[int]) -> st.SearchStrategy[Any]:
    """What graft() may be given as ``example_input``: nothing, a batch, the wrong shape or type, not a tensor."""
    small = all(isinstance(d, int) and 0 < d <= 64 for d in shape) and 0 < len(shape) <= 4
    batch = torch.randn(2, *shape) if small else torch.randn(2, 3)
    odd = [batch[0], batch.long(), torch.randn(2, 5, 5), [batch], batch.numpy(), 3.0, "x", (), (batch, batch)]
    return mostly(st.sampled_from([None, None, batch, (batch,)]), st.sampled_from(odd), odds=5)


def graft_and_run(spec: dict[str, Any], modules: bool, example_input: Any) -> None:
    """graft(), given the models built (``modules``) or built from the spec; then forward in both modes."""
    from graftnet.models import build_model

    student = teachers = None
    if modules:
        student = build_model(spec["student"]["model"], spec["student"]["kwargs"])
        teachers = {name: build_model(t["model"], t["kwargs"]) for name, t in spec["teachers"].items()}
    g = graft(student, teachers, spec, example_input=example_input)
    x = example_input if isinstance(example_input, torch.Tensor) else torch.randn(2, *spec["input_shape"])
    for mode in (True, False):
        g.train(mode)
        g(x)
    g.p_w()


@fuzz_settings(100)
@given(st.data())
def test_graft_on_generated_specs(data: st.DataObject) -> None:
    spec = data.draw(graft_specs(), label="spec")
    modules = data.draw(st.sampled_from([False, False, True]), label="modules passed")
    example_input = data.draw(example_inputs(spec["input_shape"]), label="example_input")
    only_named_errors("graft", lambda: graft_and_run(spec, modules, example_input))


# --- graftnet check SPEC --set ----------------------------------------------------------------------------------

SET_SPEC = {k: VALID_SPEC[k] for k in ("student", "teachers", "input_shape", "sites", "mixing", "train")}
SET_KEYS = [".".join(map(str, p)) for p in paths(SET_SPEC) if p]
SET_VALUES = ["[", "]", "{", "x", "3", "-1", "2**64", "18446744073709551616", "[1, 2]", "{a: 1}", "null", "~", "''",
              "&a [1, *a]", "*a", "'t:body.2'", "graftnet:mlp", "body.4", "scratch", "1e-3", ".nan", "!!binary aGk=",
              "{a: &a [1, 1], b: [*a, *a]}", "\x00", "é", "9" * 5000]  # fmt: skip


@st.composite
def set_keys(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(SET_KEYS))
    how = draw(mostly(st.just("keep"), st.sampled_from(["index", "extend", "cut", "text"]), odds=3))
    if how == "index":
        return f"{key}.{draw(st.sampled_from(['0', '1', '-1', '99', 'x', '']))}"
    if how == "extend":
        return key + draw(st.sampled_from([".", "..", ".epoch", ".0.x", "="]))
    if how == "cut":
        return key[: draw(st.integers(0, len(key)))]
    if how == "text":
        return draw(st.text(max_size=10))
    return key


SANE_VALUES = ["0.01", "1", "2", "scratch", "body.4", "[4, 4]", "'t:body.4'", "['t:body.4']", "{}", "true", "auto"]
overrides = st.lists(
    st.tuples(
        set_keys(),
        mostly(st.sampled_from(SANE_VALUES), st.sampled_from(SET_VALUES) | st.text(max_size=8), odds=2),
        mostly(st.just("="), st.just("")),
    ).map(lambda kv: f"{kv[0]}{kv[2]}{kv[1]}"),
    min_size=1,
    max_size=3,
)


@fuzz_settings(100)
@given(overrides)
def test_check_with_set_overrides(workdir: Path, items: list[str]) -> None:
    path = workdir / "set.yaml"
    if not path.exists():
        path.write_text(json.dumps(SET_SPEC))
    argv = ["check", str(path)]
    for item in items:
        argv += ["--set", item]
    only_named_errors("check_set", lambda: check(argv), exits=True)


class RefusedError(GraftError):
    """``graftnet check`` exited 2: it printed a named error."""


def check(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    if code == 2:
        raise RefusedError(err.getvalue())
    assert code == 0, code
