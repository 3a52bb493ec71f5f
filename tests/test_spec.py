"""The spec: validation with paths in errors, YAML/JSON/dict loading, JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graftnet
from graftnet.spec import Spec, load_spec

SPEC_DIR = Path(__file__).parent.parent / "specs"
SPECS = sorted(SPEC_DIR.rglob("*.yaml"))


def test_dict_yaml_and_json_give_the_same_spec(tmp_path: Path) -> None:
    data = {
        "input_shape": [3, 32, 32],
        "teachers": {"t": {"model": "timm:resnet18", "input": [{"adapter": "resize", "kwargs": {"size": [32, 32]}}]}},
        "sites": [{"student": "layer1", "taps": ["t:layer1"], "adapter": "conv1x1"}],
        "mixing": {"init": 0.7},
    }
    (tmp_path / "s.json").write_text(json.dumps(data))
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    a, b, c = load_spec(data), load_spec(tmp_path / "s.json"), load_spec(str(tmp_path / "s.yaml"))
    assert a == b == c
    assert a.sites[0].adapter == "conv1x1" and a.mixing.init == 0.7 and a.adapter == "auto"
    assert load_spec(a) is a


def test_defaults() -> None:
    spec = load_spec({})
    assert spec.sites == [] and spec.teachers == {} and spec.mixing.init == "uniform"
    assert spec.mixing.rescale_taps is True


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"site": []}, "site", "Extra inputs"),
        ({"sites": [{"student": "a", "taps": ["t:b"], "adaptor": "auto"}]}, "sites[0].adaptor", "Extra inputs"),
        ({"sites": [{"student": "a", "taps": "t:b"}]}, "sites[0].taps", "list"),
        ({"sites": [{"student": "a", "taps": ["no_teacher"]}]}, "sites[0].taps", "teacher:name"),
        ({"sites": [{"student": "a", "taps": []}]}, "sites[0].taps", "at least 1"),
        ({"sites": [{"student": "a", "taps": ["t:b", "t:b"]}]}, "sites[0].taps", "twice"),
        (
            {"sites": [{"student": "a", "taps": ["t:b"]}, {"student": "a", "taps": ["t:c"]}]},
            "sites[1].student",
            "twice",
        ),
        ({"input_shape": [3, 0, 32]}, "input_shape", "positive"),
        ({"mixing": {"init": 1.5}}, "mixing.init", "between 0 and 1"),
        ({"mixing": {"calibration_batches": 0}}, "mixing.calibration_batches", "greater than or equal to 1"),
        ({"student": {"model": "resnet18"}}, "student.model", "SOURCE:NAME"),
        ({"teachers": {"bad-name": {}}}, "teachers", "identifier"),
    ],
)
def test_errors_name_the_offending_path(data: dict, path: str, words: str) -> None:
    with pytest.raises(graftnet.SpecError) as info:
        load_spec(data)
    message = str(info.value)
    assert f"  {path}:" in message or f"{path}:" in message, message
    assert words in message


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites:\n  - student: a\n    taps: [t:b\n")
    with pytest.raises(graftnet.SpecError, match=r"malformed YAML in .*bad.yaml at line \d+"):
        load_spec(bad)


def test_malformed_json_reports_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"sites": [\n  {"student": }\n]}')
    with pytest.raises(graftnet.SpecError, match=r"malformed JSON in .*bad.json at line 2"):
        load_spec(bad)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(graftnet.SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(graftnet.SpecError, match="top level must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_schema_is_json_and_forbids_extra_keys() -> None:
    schema = graftnet.schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert {"sites", "teachers", "mixing", "adapter", "input_shape", "student"} <= set(schema["properties"])
    assert schema["$defs"]["SiteSpec"]["additionalProperties"] is False


def _random_weights(spec: Spec) -> Spec:
    """The spec with every weights file dropped: bundled specs point at runs that are not trained here."""
    teachers = {name: t.model_copy(update={"weights": None}) for name, t in spec.teachers.items()}
    student = spec.student.model_copy(update={"weights": None}) if spec.student else None
    return spec.model_copy(update={"teachers": teachers, "student": student})


@pytest.mark.parametrize("path", SPECS, ids=[str(p.relative_to(SPEC_DIR)) for p in SPECS])
def test_bundled_specs_resolve_with_random_weights(path: Path) -> None:
    from graftnet.data import DATASETS
    from graftnet.training.objectives import METHODS

    spec = _random_weights(load_spec(path))
    assert isinstance(spec, Spec)
    g = graftnet.graft(None, None, spec)
    assert set(g.p_w()) == {s.name for s in g.plan.sites}
    if spec.rl is not None:  # an RL spec: its environment exists and the student fits its observations and actions
        from graftnet.rl.envs import env_info

        shape, actions = env_info(spec.rl.env)
        assert spec.train is not None and spec.train.method in METHODS
        assert list(shape) == spec.input_shape
        with torch.no_grad():
            logits, value = g.eval()(torch.randn(2, *shape))
        assert logits.shape == (2, actions) and value.shape == (2,)
    elif spec.train is not None:  # a training spec: its dataset and method exist, its student fits the data
        assert spec.data is not None and spec.data.dataset in DATASETS
        assert spec.train.method in METHODS or spec.train.method == "ban"  # ban runs a sequence of methods
        with torch.no_grad():
            out = g.eval()(torch.randn(2, *spec.input_shape or []))
        classes = len(spec.data.classes) if spec.data.classes else {"cifar100": 100, "emnist_letters": 26}.get(
            spec.data.dataset, 10
        )
        assert out.shape == (2, classes)
        ban = spec.train.ban
        if ban is not None and ban.teacher_model is not None:  # a born-again generation 0 of another architecture
            gen0 = graftnet.build_model(ban.teacher_model.model, ban.teacher_model.kwargs).eval()
            with torch.no_grad():
                assert gen0(torch.randn(2, *spec.input_shape or [])).shape == (2, classes)
