"""Property tests for detach and export over generated students, teachers and specs (tests/_archs.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from _archs import Case, build, graft_cases
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file

import graftnet

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _independent(g: graftnet.GraftedModel) -> None:
    for mixer in g.mixers.values():
        with torch.no_grad():
            mixer.logits.copy_(torch.tensor([0.0] + [-float("inf")] * len(mixer.taps)))


@SETTINGS
@given(graft_cases())
def test_detach_of_a_graft_is_isomorphic_to_the_student(case: Case) -> None:
    reference = copy.deepcopy(case.student)
    g = graftnet.graft(case.student, case.teachers, case.spec, example_input=case.x.clone())
    _independent(g)
    student = graftnet.detach(g)
    assert type(student) is type(reference)
    assert graftnet.is_isomorphic(student, reference)
    assert list(student.state_dict()) == list(reference.state_dict())
    g.eval()
    student.eval()
    assert torch.equal(g(case.x.clone()), student(case.x.clone()))


@SETTINGS
@given(graft_cases())
def test_a_graft_with_no_sites_is_isomorphic_to_the_student(case: Case) -> None:
    g = graftnet.graft(case.student, case.teachers, {"sites": []}, example_input=case.x.clone())
    assert not g.mixers and not list(g.teachers)
    for mode in (False, True):
        g.train(mode)
        case.student.train(mode)
        assert graftnet.is_isomorphic(g.graph, case.student)


@SETTINGS
@given(graft_cases())
def test_a_graft_with_sites_is_not_isomorphic_to_the_student(case: Case) -> None:
    g = graftnet.graft(case.student, case.teachers, case.spec, example_input=case.x.clone())
    g.eval()
    case.student.eval()
    assert not graftnet.is_isomorphic(g.graph, case.student)


@SETTINGS
@given(graft_cases())
def test_export_then_load_is_bit_exact(tmp_path_factory: object, case: Case) -> None:
    tmp = Path(tmp_path_factory.mktemp("export"))  # type: ignore[attr-defined]
    spec = dict(case.spec, input_shape=list(case.x.shape[1:]))
    g = graftnet.graft(case.student, case.teachers, spec, example_input=case.x.clone())
    _independent(g)
    report = graftnet.export(g, tmp / "student.safetensors")
    assert report.max_abs_diff == 0.0 and report.argmax_agreement == 1.0
    fresh = build(case.student_arch, seed=case.seed + 1000)
    fresh.load_state_dict(load_file(str(tmp / "student.safetensors")), strict=True)
    for key, value in g.student.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
