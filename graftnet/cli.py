"""The ``graftnet`` command line: nodes, check, train, tune, export, plot, demo, schema.

Each command is a thin layer over a public function of the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from graftnet.errors import GraftError, SpecError

__all__ = ["main"]


def _default_input_shape(model: Any, ref: str) -> tuple[int, ...] | None:
    shape = getattr(model, "input_shape", None)  # graftnet's own models
    if shape is not None:
        return tuple(shape)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)  # timm
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    if ref.startswith("torchvision:"):
        return (3, 224, 224)
    return None


def _parse_kwargs(text: str | None) -> dict[str, Any]:
    from graftnet.spec import parse_yaml, short_repr

    if not text:
        return {}
    value = parse_yaml(text, f"--kwargs {short_repr(text)}")
    if not isinstance(value, dict):
        raise SpecError(f"--kwargs must be a mapping such as '{{num_classes: 10}}', got {short_repr(text)}")
    return value


def _nodes(args: argparse.Namespace) -> None:
    from graftnet.graft import sites
    from graftnet.models import build_model
    from graftnet.report import sites_table
    from graftnet.spec import input_shape_problem

    model = build_model(args.model, _parse_kwargs(args.kwargs))
    shape = tuple(args.input_shape) if args.input_shape else _default_input_shape(model, args.model)
    if shape is None:
        raise GraftError(f"cannot tell the input shape of {args.model}: pass --input-shape, e.g. --input-shape 3 32 32")
    problem = input_shape_problem(list(shape))
    if problem is not None:
        raise SpecError(f"--input-shape: {problem}")
    infos = sites(model, input_shape=shape)
    acts = sum(s.kind != "output" for s in infos)
    output = " and the output" if acts < len(infos) else ""
    print(f"# {args.model} on input {shape}: {acts} graftable activations{output} "
          "(pre-activation shapes without the batch dim, and layouts)")  # fmt: skip
    print(sites_table(infos))


def _check(args: argparse.Namespace) -> None:
    from graftnet.spec import load_spec

    spec = load_spec(_with_overrides(args.spec, args.set))  # a bad spec is reported before torch is imported

    from graftnet.graft import graft
    from graftnet.report import describe

    g = graft(None, None, spec)
    overrides = "".join(f" --set {item}" for item in args.set)
    print(f"spec {args.spec}{' with' + overrides if overrides else ''}: OK")
    print(describe(g))


def _export(args: argparse.Namespace) -> None:
    from graftnet.checkpoint import export

    report = export(args.source, args.out, tol=args.tol, force=args.force, overwrite=args.overwrite, spec=args.spec,
                    allow_unverified=args.allow_unverified)  # fmt: skip
    forced = " (forced: some site was below 1 - tol)" if report.forced else ""
    print(f"wrote {report.path}{forced}")
    print(f"  min p_w(student) over sites: {report.min_p_w_student:.6f}")
    print(f"  probe batch: max |grafted - detached| = {report.max_abs_diff:.3e}, "
          f"argmax agreement = {report.argmax_agreement:.1%}")
    print(f"  spec sha256: {report.spec_sha256}")


def _with_overrides(path: str, overrides: Sequence[str]) -> Any:
    """The spec file with ``--set KEY=VALUE`` overrides applied and validated, or the path if there are none."""
    if not overrides:
        return path
    from graftnet.spec import override_spec, parse_overrides

    return override_spec(path, *parse_overrides(overrides))


def _train(args: argparse.Namespace) -> int:
    import signal

    from graftnet.launch import train

    out = Path(args.out) if args.out else Path("runs") / Path(args.spec).stem
    spec = _with_overrides(args.spec, args.set)
    result = train(spec, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                   tensorboard=not args.no_tensorboard)  # fmt: skip
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for every process
        return 128 + int(signal.Signals[result.interrupted]) if result.interrupted else 0
    if result.interrupted:
        print(f"{result.interrupted}: stopped at {result.progress}; the checkpoint is saved in {out}. "
              f"Continue with: graftnet train {args.spec} --out {out} --resume", file=sys.stderr)  # fmt: skip
        return 128 + int(signal.Signals[result.interrupted])
    print("\n".join(result.summary()))
    return 0


def _tune(args: argparse.Namespace) -> None:
    from graftnet.tune import parse_grid, tune

    spec = _with_overrides(args.spec, args.set)
    tune(spec, parse_grid(args.grid), args.out, seeds=args.seeds, choose_seeds=args.choose_seeds,
         overwrite=args.overwrite, plots=not args.no_plots)


def _plot(args: argparse.Namespace) -> None:
    from graftnet.plot import plot_runs

    for path in plot_runs(args.runs, args.out, smooth=args.smooth):
        print(f"wrote {path}")


def _demo(args: argparse.Namespace) -> None:
    from graftnet.demo import DemoConfig, demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.seeds is not None:
        cfg = replace(cfg, seeds=args.seeds)
    if args.target_train is not None:
        cfg = replace(cfg, target_train=args.target_train)
    demo(args.out, cfg)


def _schema(args: argparse.Namespace) -> None:
    from graftnet.spec import schema

    print(json.dumps(schema(), indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graftnet", description="Knowledge flow by FX graph surgery.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("nodes", help="list a model's graftable activations with their pre-activation shapes")
    p.add_argument("model", help="model reference: timm:NAME, torchvision:NAME, graftnet:NAME, package.module:callable")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="N", help="one sample's shape, e.g. 3 32 32")
    p.add_argument("--kwargs", help="constructor keyword arguments as YAML/JSON, e.g. '{num_classes: 10}'")
    p.set_defaults(run=_nodes)

    p = sub.add_parser("check", help="validate a spec, build its models and print the resolved graft plan")
    p.add_argument("spec", help="YAML or JSON spec file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field as train does, e.g. --set sites.0.student=layer2 (repeatable)")
    p.set_defaults(run=_check)

    p = sub.add_parser("train", help="train a spec's student (scratch, finetune, kd, knowledge_flow), then export it")
    p.add_argument("spec", help="YAML or JSON spec with student, data and train sections")
    p.add_argument("--out", help="run folder (default runs/SPEC_NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set train.method=scratch --set train.seed=1 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that is not empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs")
    p.set_defaults(run=_train)

    p = sub.add_parser("tune", help="choose settings on validation over a grid, then rerun the choice with seeds")
    p.add_argument("spec", help="YAML or JSON spec with student, data and train sections")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to try for a spec field, e.g. --grid train.lr=1e-3,3e-3,1e-2 (repeatable: every "
                   "combination is tried)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="runs of the chosen setting, seeds train.seed, +1, ... (3)")
    p.add_argument("--choose-seeds", type=int, default=1, metavar="N",
                   help="seeds every setting runs with before the choice, made on their mean validation error (1)")
    p.add_argument("--out", required=True, help="folder for the runs, results.csv/.md, chosen.yaml and plots/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field for every run, as train does (repeatable)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start over runs whose folder holds another spec's run")
    p.add_argument("--no-plots", action="store_true", help="no PNGs")
    p.set_defaults(run=_tune)

    p = sub.add_parser("plot", help="p_w per site (the paper's Fig. 1c), accuracy or return curves; seeds averaged")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by graftnet train")
    p.add_argument("--out", default="plots", help="folder for the PNGs (default ./plots)")
    p.add_argument("--smooth", type=float, default=0.0, metavar="W",
                   help="exponential moving average weight in [0, 1) for the accuracy/return curves, like "
                   "TensorBoard's smoothing slider (default 0: none)")  # fmt: skip
    p.set_defaults(run=_plot)

    p = sub.add_parser("demo", help="teachers, baselines and knowledge flow on built-in MNIST-1D, in minutes")
    p.add_argument("--out", default="runs/demo", help="folder for the runs, tables and plots (default runs/demo)")
    p.add_argument("--seeds", type=int, help="seeds per method (default 3)")
    p.add_argument("--target-train", type=int, help="labelled target samples (default 100)")
    p.add_argument("--quick", action="store_true", help="a tiny version that runs in seconds (for smoke tests)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("export", help="detach a run's student, verify it on a probe batch, write it as safetensors")
    p.add_argument("source", metavar="RUN_OR_CKPT", help="a run folder (holding checkpoint.safetensors) or the file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--tol", type=float, default=1e-3, help="every site needs p_w(student) >= 1 - tol (default 1e-3)")
    p.add_argument("--force", action="store_true", help="export even if some site still relies on teachers")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-unverified", action="store_true",
                   help="read a checkpoint written before integrity hashes (format /1): its structure and values are "
                   "still checked, its bytes cannot be")
    p.add_argument("--spec", metavar="SPEC",
                   help="a spec you trust (YAML/JSON): the model references in the checkpoint must match it")
    p.set_defaults(run=_export)

    p = sub.add_parser("schema", help="print the spec's JSON Schema")
    p.set_defaults(run=_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from graftnet.provenance import record_command

    record_command(["graftnet", *(sys.argv[1:] if argv is None else argv)])
    if args.version:
        from graftnet._version import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.run(args)
    except GraftError as e:
        print(f"graftnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (graftnet schema | head): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:  # the file system refused: a path that is missing, a directory, not writable, a full disk
        where = f" {e.filename!r}" if e.filename is not None else ""
        print(f"graftnet {args.command}: error: {e.strerror or e}:{where} ({type(e).__name__}); check the path and "
              "its permissions", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
