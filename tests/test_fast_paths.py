"""Fast paths: torch.compile without graph breaks, mixed precision, channels-last (issue 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo as dynamo

import graftnet
from graftnet.demo import STUDENT, WIDE
from graftnet.models import build_model
from graftnet.training.objectives import KnowledgeFlow


def _demo_graft() -> tuple[graftnet.GraftedModel, torch.Tensor]:
    """The demo's knowledge-flow model: the 3-layer 1-D convnet with a related teacher and the wide one."""
    torch.manual_seed(0)
    student, related, wide = (build_model(m["model"], m["kwargs"]) for m in (STUDENT, STUDENT, WIDE))
    sites = [{"student": f"features.act{i}", "taps": [f"related:features.act{i}", f"wide:features.act{i}"]}
             for i in (1, 2, 3)]  # fmt: skip
    x = torch.randn(8, 1, 40)
    return graftnet.graft(student, {"related": related, "wide": wide}, {"sites": sites}, example_input=x[:2]), x


def _resnet_graft() -> tuple[graftnet.GraftedModel, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    student, teacher = timm.create_model("resnet18", num_classes=10), timm.create_model("resnet18", num_classes=100)
    spec = {"sites": [{"student": "layer1", "taps": ["t:layer2"]}, {"student": "layer2", "taps": ["t:layer2"]}]}
    x = torch.randn(4, 3, 32, 32)
    return graftnet.graft(student, {"t": teacher}, spec, example_input=x[:2]), x


def _a3c_graft() -> tuple[graftnet.GraftedModel, torch.Tensor]:
    torch.manual_seed(0)
    student, t1, t2 = (build_model("graftnet:a3c", {"num_actions": n}) for n in (6, 18, 4))
    sites = [{"student": s, "taps": [f"a:{s}", f"b:{s}"]} for s in ("features.1", "features.3", "act")]
    x = torch.randn(4, 4, 84, 84)
    return graftnet.graft(student, {"a": t1, "b": t2}, {"sites": sites}, example_input=x[:2]), x


def _breaks(fn: Any, x: torch.Tensor) -> list[str]:
    """Every graph break torch.compile would make in ``fn(x)``, with where it happened."""
    dynamo.reset()
    explained = dynamo.explain(fn)(x)
    return [f"{r.reason} at {r.user_stack[-1].filename}:{r.user_stack[-1].lineno}" for r in explained.break_reasons]


def check_one_graph_in_every_pass(build: Any) -> None:
    """Every pass of ``build()``'s graft traces to one graph: train (calibrating and calibrated), θ_old, eval."""
    g, x = build()
    kf = KnowledgeFlow(g, {"lambda2": 0.1}, total_steps=10)
    assert kf.snapshot is not None
    g.train()
    assert _breaks(g, x) == [], "train, tap scales calibrating"
    for _ in range(4):
        g(x)  # calibration ends (the count is a buffer: no new graph)
    with g.reusing_teacher_features():
        g(x)
        assert _breaks(kf.snapshot.shadow, x) == [], "θ_old pass"
    assert _breaks(g, x) == [], "train"
    g.keep_feature_hints()
    assert _breaks(g, x) == [], "train, keeping the feature hints"
    g.keep_feature_hints(False)
    g.eval()
    with torch.no_grad():
        assert _breaks(g, x) == [], "eval"


@pytest.mark.parametrize("build", ["_demo_graft", "_resnet_graft", "_a3c_graft"], ids=["demo", "timm-resnet18", "a3c"])
def test_the_grafted_model_compiles_to_one_graph_in_every_pass(build: str) -> None:
    # In a fresh interpreter: after torch._dynamo.explain, a backward in the same process leaves autograd in a
    # state that forked processes (the A3C workers of later tests) cannot use.
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_fast_paths as t; "
            f"t.check_one_graph_in_every_pass(t.{build}); print('ONE GRAPH')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "ONE GRAPH" in done.stdout, done.stderr[-3000:]


def _kf_steps(settings: dict[str, Any], steps: int = 3) -> tuple[list[dict[str, float]], KnowledgeFlow]:
    """A few knowledge-flow steps of a small MLP graft (dropout off: the runs must be comparable)."""
    torch.manual_seed(0)
    small = {"in_features": 12, "hidden": [16, 16], "num_classes": 3}
    student, teacher = build_model("graftnet:mlp", small), build_model("graftnet:mlp", small)
    spec = {"input_shape": [12], "sites": [{"student": "body.2", "taps": ["t:body.2"]}]}
    g = graftnet.graft(student, {"t": teacher}, spec).train()
    kf = KnowledgeFlow(g, {"lambda2": 0.5, **settings}, total_steps=10)
    opt = torch.optim.Adam(kf.param_groups())
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    parts = []
    for _ in range(steps):
        loss = kf.loss(x, y, 0.5)
        opt.zero_grad()
        kf.backward(loss.total)
        kf.step(opt)
        parts.append({k: float(v.detach()) for k, v in {"total": loss.total, **loss.parts}.items()})
    return parts, kf


def test_compiled_knowledge_flow_trains_like_eager() -> None:
    eager, _ = _kf_steps({})
    compiled, kf = _kf_steps({"compile": True})
    assert kf._compiled is not None and kf._compiled[0] is kf.model  # the model really ran compiled
    for e, c in zip(eager, compiled, strict=True):
        assert c == pytest.approx(e, rel=1e-4, abs=1e-5)


def test_compiled_knowledge_flow_with_the_feature_hint_trains_like_eager() -> None:
    eager, _ = _kf_steps({"feature_hint": 1.0})
    compiled, _ = _kf_steps({"feature_hint": 1.0, "compile": True})
    assert all(e["hint_loss"] > 0 for e in eager)
    for e, c in zip(eager, compiled, strict=True):
        assert c == pytest.approx(e, rel=1e-4, abs=1e-5)


def test_bf16_autocast_stays_close_to_fp32_and_keeps_w_in_fp32() -> None:
    fp32, _ = _kf_steps({})
    bf16, kf = _kf_steps({"precision": "bf16"})
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=3e-2, abs=3e-3)  # bfloat16 keeps 8 bits of mantissa
    mixer = next(iter(kf.model.mixers.values()))
    assert mixer.logits.dtype == torch.float32 and mixer.logits.grad is not None
    assert mixer.logits.grad.dtype == torch.float32
    assert kf.model.dependency_loss().dtype == torch.float32
    x = torch.randn(4, 12)
    with kf.autocast(x):
        assert kf.model(x).dtype == torch.bfloat16  # the forward really ran in bfloat16...
        assert mixer.p_w().dtype == torch.float32  # ...but the mixing weights did not
    assert kf.forward(x).dtype == torch.float32  # and what the losses see is float32


def test_fp16_scales_the_loss_and_resumes_the_scale() -> None:
    parts, kf = _kf_steps({"precision": "fp16"})
    assert all(all(v == v for v in p.values()) for p in parts)  # finite losses
    assert kf.scaler is not None and kf.scaler.get_scale() > 1  # the loss was scaled up before backward
    state = kf.extra_state()
    assert {"grad_scaler.scale", "grad_scaler._growth_tracker"} <= set(state)
    _, fresh = _kf_steps({"precision": "fp16"}, steps=0)
    fresh.load_extra_state(state)
    fresh.backward(fresh.loss(torch.randn(4, 12), torch.randint(0, 3, (4,))).total)
    assert fresh.scaler is not None and fresh.scaler.get_scale() == kf.scaler.get_scale()


def test_channels_last_puts_weights_and_inputs_in_that_layout_and_computes_the_same() -> None:
    g, x = _a3c_graft()
    reference = KnowledgeFlow(g, {"lambda2": 0.1}, total_steps=10)
    g.eval()
    with torch.no_grad():
        expected = reference.forward(x)[0]
    kf = KnowledgeFlow(g, {"lambda2": 0.1, "channels_last": True}, total_steps=10)
    conv = g.student.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert kf.prepare(x).is_contiguous(memory_format=torch.channels_last)
    assert kf.snapshot is not None
    assert kf.snapshot.tensors["student.features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(kf.forward(x)[0], expected, atol=1e-5)


def test_fit_takes_compile_and_precision(tmp_path: Any) -> None:
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    small = {"in_features": 12, "hidden": [16], "num_classes": 3}
    data = TensorDataset(torch.randn(64, 12), torch.randint(0, 3, (64,)))
    spec = {"sites": [{"student": "body.2", "taps": ["t:body.2"]}], "train": {"epochs": 1, "threads": 1}}
    result = graftnet.fit(build_model("graftnet:mlp", small), {"t": build_model("graftnet:mlp", small)}, spec,
                          train=data, val=data, run_dir=tmp_path / "run", precision="bf16", progress=False,
                          tensorboard=False)  # fmt: skip
    assert result.val_error is not None
    with pytest.raises(graftnet.SpecError, match="precision"):
        graftnet.fit(build_model("graftnet:mlp", small), {"t": build_model("graftnet:mlp", small)}, spec,
                     train=data, val=data, run_dir=tmp_path / "bad", precision="fp8")  # fmt: skip


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tap_scales_average_the_first_batches_eager_or_compiled(compiled: bool) -> None:
    from graftnet.mixer import Mixer

    torch.manual_seed(0)
    mixer = Mixer("act", ["t:a", "t:b"], [torch.nn.Identity(), torch.nn.Identity()], calibration_batches=4).train()
    run = torch.compile(mixer, backend="eager", fullgraph=True) if compiled else mixer
    batches = [(torch.randn(8, 5), torch.randn(8, 5) * (k + 1), torch.randn(8, 5) * 10) for k in range(6)]
    for z, a, b in batches:
        run(z, a, b)
        if compiled:
            mixer.after_compiled_pass()  # what the objective does after a compiled training pass
    means = torch.tensor([[a.abs().mean(), b.abs().mean()] for _, a, b in batches[:4]]).mean(0)
    assert torch.allclose(mixer.tap_scale, 1.0 / means, rtol=1e-5)  # batches 5 and 6 changed nothing
    assert int(mixer.calibrated_batches) == 4 and not mixer.calibrating


def test_a_compiled_mixer_without_the_host_update_still_calibrates_right() -> None:
    from graftnet.mixer import Mixer

    torch.manual_seed(0)
    mixer = Mixer("act", ["t:a"], [torch.nn.Identity()], calibration_batches=2).train()
    run = torch.compile(mixer, backend="eager", fullgraph=True)
    batches = [(torch.randn(8, 5), torch.randn(8, 5) * (k + 1)) for k in range(4)]
    for z, a in batches:
        run(z, a)  # the host never hears that calibration ended: the masked update keeps the scale anyway
    assert torch.allclose(mixer.tap_scale, 1.0 / ((batches[0][1].abs().mean() + batches[1][1].abs().mean()) / 2))
    mixer(*batches[0])  # nor does an eager call after them change it
    assert int(mixer.calibrated_batches) == 2


def test_fit_with_fp16_checkpoints_the_gradient_scaler(tmp_path: Any) -> None:
    from safetensors import safe_open
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    small = {"in_features": 12, "hidden": [16], "num_classes": 3}
    data = TensorDataset(torch.randn(64, 12), torch.randint(0, 3, (64,)))
    spec = {"sites": [{"student": "body.2", "taps": ["t:body.2"]}], "train": {"epochs": 1, "threads": 1}}
    graftnet.fit(build_model("graftnet:mlp", small), {"t": build_model("graftnet:mlp", small)}, spec, train=data,
                 val=data, run_dir=tmp_path / "run", precision="fp16", progress=False, tensorboard=False)  # fmt: skip
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("grad_scaler.scale") for k in keys), keys[:20]  # a resume keeps the loss scale


def _reference_mix(mixer: graftnet.Mixer, z: torch.Tensor, *taps: torch.Tensor) -> torch.Tensor:
    """The mixer's formula written out: p_0·z + Σ_l p_l·Q_l(s_l·t_l)."""
    p = torch.softmax(mixer.logits.detach(), 0)
    out = p[0] * z
    for k, (adapter, t) in enumerate(zip(mixer.adapters, taps, strict=True)):
        out = out + p[k + 1] * adapter(mixer.tap_scale[k] * t)
    return out


def test_the_kept_fold_scales_follow_every_change_of_the_tap_scales() -> None:
    """The folded tap scales are kept between calls (they cost four small ops to build), so every way the tap
    scales change must reach the next call: calibration, load_state_dict, an in-place copy, a device or dtype
    move, and inference mode (whose tensors cannot be saved for a later backward)."""
    torch.manual_seed(0)
    mixer = graftnet.Mixer("act", ["a:act", "b:act"], [torch.nn.Identity(), torch.nn.Linear(4, 4)],
                           calibration_batches=2)  # fmt: skip
    z, t1, t2 = torch.randn(3, 4), torch.randn(3, 4), 5 * torch.randn(3, 4)
    with torch.no_grad():
        mixer.train()
        for _ in range(3):  # calibration changes the scales on every call, then stops
            before = mixer.tap_scale.clone()
            out = mixer(z, t1, t2)
            assert torch.allclose(out, _reference_mix(mixer, z, t1, t2), atol=1e-6)
        assert not torch.equal(before, torch.ones(2))
        mixer.load_state_dict({**mixer.state_dict(), "tap_scale": torch.tensor([0.25, 4.0])})
        assert torch.allclose(mixer(z, t1, t2), _reference_mix(mixer, z, t1, t2), atol=1e-6)
        mixer.tap_scale.copy_(torch.tensor([2.0, 0.5]))
        assert torch.allclose(mixer(z, t1, t2), _reference_mix(mixer, z, t1, t2), atol=1e-6)
        mixer.double()
        out = mixer(z.double(), t1.double(), t2.double())
        assert out.dtype == torch.float64
        assert torch.allclose(out, _reference_mix(mixer, z.double(), t1.double(), t2.double()), atol=1e-12)
        mixer.float()
    with torch.inference_mode():
        mixer(z, t1, t2)
    zg = z.clone().requires_grad_()
    mixer(zg, t1, t2).sum().backward()  # would fail on a scale tensor made in inference mode
    assert mixer.logits.grad is not None and torch.isfinite(mixer.logits.grad).all()


def test_the_kept_coefficients_follow_every_change_of_w() -> None:
    """Without autograd a mixer keeps its coefficients between calls (an RL rollout's steps all mix with one w),
    so every way w changes must reach the next such call: an optimizer step, the floor's projection,
    load_state_dict, an in-place copy, a dtype move. w in shared memory (A3C's workers) is never kept: another
    process's write does not bump this one's version counter (simulated here by a write through numpy)."""
    torch.manual_seed(0)
    mixer = graftnet.Mixer("act", ["a:act", "b:act"], [torch.nn.Identity(), torch.nn.Linear(4, 4)],
                           calibration_batches=0)  # fmt: skip
    z, t1, t2 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    optimizer = torch.optim.SGD(mixer.parameters(), lr=1.0)

    def same_as_the_formula(dtype: torch.dtype = torch.float32) -> None:
        with torch.no_grad():
            args = [u.to(dtype) for u in (z, t1, t2)]
            assert torch.allclose(mixer(*args), _reference_mix(mixer, *args), atol=1e-6)
            assert torch.equal(mixer(*args), mixer(*args))  # the kept coefficients, once more

    same_as_the_formula()
    mixer(z.clone().requires_grad_(), t1, t2).pow(2).sum().backward()
    optimizer.step()
    same_as_the_formula()
    g = graftnet.graft(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()),
                       {"t": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())},
                       {"sites": [{"student": "1", "taps": ["t:1"]}]}, example_input=torch.zeros(1, 4))  # fmt: skip
    site = next(iter(g.mixers.values()))
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = g(x)
        g.raise_student_floor(0.99)  # the projection writes w in place
        after = g(x)
    assert site.p_w()[0].item() == pytest.approx(0.99) and not torch.equal(before, after)
    assert torch.equal(after, g(x).detach())  # with autograd the coefficients are computed afresh
    mixer.load_state_dict({**mixer.state_dict(), "logits": torch.tensor([1.0, -1.0, 0.5])})
    same_as_the_formula()
    with torch.no_grad():
        mixer.logits.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    same_as_the_formula()
    mixer.double()
    same_as_the_formula(torch.float64)
    mixer.float()
    mixer.share_memory()
    same_as_the_formula()
    mixer.logits.detach().numpy()[:] = [0.0, 4.0, -4.0]  # no version bump, as another process's write
    same_as_the_formula()


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_the_pointwise_input_adapter_computes_the_1x1_convolution(rank: int) -> None:
    """The conv1x1 input adapter is a batched matrix product (oneDNN's convolution is 13–20× slower for an Atari
    observation's four channels): the same parameters as the convolution, the same values and gradients, and the
    convolution itself for inputs that are not a contiguous batch."""
    from graftnet.adapters import INPUT_ADAPTERS, PointwiseConv1d, PointwiseConv2d, PointwiseConv3d

    torch.manual_seed(0)
    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[rank - 1](3, 5, kernel_size=1)
    pointwise = (PointwiseConv1d, PointwiseConv2d, PointwiseConv3d)[rank - 1](3, 5)
    pointwise.load_state_dict(conv.state_dict())  # the same names and shapes: checkpoints do not change
    assert isinstance(INPUT_ADAPTERS.get("conv1x1")((3, *[6] * rank), out_channels=5), type(pointwise))
    x = torch.randn(4, 3, *[6] * rank)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = pointwise(xa)
    expected = conv(xb)
    assert torch.allclose(out, expected, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for mine, theirs in ((xa.grad, xb.grad), (pointwise.weight.grad, conv.weight.grad),
                         (pointwise.bias.grad, conv.bias.grad)):  # fmt: skip
        assert mine is not None and theirs is not None and torch.allclose(mine, theirs, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(pointwise(x[0]), conv(x[0]))  # no batch dimension: the convolution
        if rank == 2:
            last = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(pointwise(last), conv(last))  # another memory layout: the convolution
