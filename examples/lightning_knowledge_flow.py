"""Knowledge flow in a PyTorch Lightning ``LightningModule``, driven by graftnet's objective API.

A teacher learns MNIST-1D digits 5–9; a student learns digits 0–4 from few labels with the teacher grafted
into it at ``features.act1..3``. Lightning runs the loop and :class:`graftnet.KnowledgeFlow` supplies the rest:
the loss (task + λ1(t)·dependency + λ2·KL to θ_old), the parameter groups (student, mixing logits w, adapters Q),
the θ_old refresh and the teacher cut. At the end the student is detached and evaluated alone.

    pip install lightning        # not a graftnet dependency (only in the dev extra)
    python examples/lightning_knowledge_flow.py [--epochs 30] [--samples 4000] [--labels 100] [--max-steps N]

Where the objective's calls sit in Lightning's loop:

- ``training_step``: ``objective.loss(x, y, progress)`` with progress = global_step / total_steps;
- ``on_before_optimizer_step`` (after backward, before ``optimizer.step()``): ``objective.before_step()``
  refreshes θ_old, so the KL term compares the model with its parameters of one step ago;
- ``on_train_batch_end`` (after the step): ``objective.after_step()`` raises the floor of p_w(student)
  (``train.p_w_floor``), which hands every site over to the student by the cut;
- ``on_train_epoch_start``: ``objective.maybe_cut(epoch / max_epochs, example)`` removes the teachers at
  ``cut_teachers_at``, and the module re-registers ``objective.model`` (now the plain student graft).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Dataset

import graftnet
from graftnet.data import make_splits

SITES = ("features.act1", "features.act2", "features.act3")


def min_p_w(model: graftnet.GraftedModel) -> float:
    """The smallest p_w(student) over the sites (1.0 without sites: after the cut the student is all there is)."""
    return min((row["student"] for row in model.p_w().values()), default=1.0)


class KnowledgeFlowModule(pl.LightningModule):
    """Trains ``objective.model`` with the knowledge-flow loss; Lightning owns the loop, device and optimizer."""

    def __init__(self, objective: graftnet.KnowledgeFlow, example: torch.Tensor) -> None:
        super().__init__()
        self.objective = objective  # not an nn.Module: it holds θ_old and the clock besides the model
        self.model = objective.model  # registered, so Lightning moves it, counts it and switches train/eval
        self.register_buffer("example", example[:2].clone(), persistent=False)  # to re-trace the student at the cut
        self.p_w_start = min_p_w(objective.model)
        self.cut_epoch: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def on_fit_start(self) -> None:
        # Lightning has moved (and perhaps cast) the model by now; θ_old lives outside any nn.Module, so let the
        # objective bring it to the parameters' device and dtype.
        self.objective.to(self.device)

    def on_train_epoch_start(self) -> None:
        if self.objective.maybe_cut(self.current_epoch / self.trainer.max_epochs, self.example) is not None:
            # The plain graft wraps the same student module, so the optimizer's student parameters stay valid (w and
            # Q just get no more gradients). Re-registering drops the old graft and its teachers from the module.
            self.model = self.objective.model
            self.cut_epoch = self.current_epoch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        # Lightning calls optimizer.step() itself, so objective.step() never ticks the clock: global_step is it.
        self.objective.steps = self.global_step
        progress = self.objective.progress()
        out = self.objective.loss(x, y, progress)
        self.log("loss", out.total, prog_bar=True)
        self.log_dict(out.parts)  # task_loss, dep_loss (until the cut), kl_loss
        self.log("lambda1", self.objective.lambda1(progress))
        if self.objective.model.mixers:
            self.log("p_w_student_min", min_p_w(self.objective.model), prog_bar=True)
        self.log("train_acc", (out.logits.detach().argmax(-1) == y).float().mean())
        return out.total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning runs this after backward and before optimizer.step(): θ_old becomes the pre-step parameters.
        self.objective.before_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After optimizer.step() (global_step has ticked): the floor of p_w(student) rises with the clock.
        self.objective.steps = self.global_step
        self.objective.after_step()

    def on_train_end(self) -> None:
        self.objective.steps = self.global_step  # the last step's tick, for whoever reads the objective next

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.objective.param_groups())  # each group has its own lr
        total = self.objective.total_steps or self.trainer.estimated_stepping_batches
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def loader(data: Dataset[Any], batch_size: int, seed: int | None = None) -> DataLoader[Any]:
    """Batches of ``data``; shuffled by a generator of its own when ``seed`` is given, so runs repeat exactly."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(data, batch_size, shuffle=seed is not None, generator=generator)


@torch.no_grad()
def error(model: nn.Module, batches: DataLoader[Any]) -> float:
    model.eval()
    wrong = sum(int((model(x).argmax(-1) != y).sum()) for x, y in batches)
    return wrong / len(batches.dataset)  # type: ignore[arg-type]


def make_student(args: argparse.Namespace) -> nn.Module:
    return graftnet.build_model("graftnet:cnn1d", {"num_classes": 5, "channels": [args.width] * 3})


def train_teacher(train: Dataset[Any], args: argparse.Namespace) -> nn.Module:
    """A plain PyTorch loop: the teacher only has to know digits 5–9, it is frozen inside the graft."""
    torch.manual_seed(args.seed)
    teacher = make_student(args).train()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for epoch in range(args.teacher_epochs):
        for x, y in loader(train, 64, seed=args.seed + epoch):
            optimizer.zero_grad()
            F.cross_entropy(teacher(x), y).backward()
            optimizer.step()
    return teacher.eval()


@dataclass
class Setup:
    objective: graftnet.KnowledgeFlow
    train: DataLoader[Any]
    val: DataLoader[Any]
    test: DataLoader[Any]
    example: torch.Tensor
    teacher_error: float


def build(args: argparse.Namespace) -> Setup:
    """Data, teacher, graft and objective: deterministic in ``args.seed``, so a test can rebuild them."""
    data = {"samples": args.samples}
    source = make_splits("mnist1d", data, classes=[5, 6, 7, 8, 9], val_size=0.1, augment=False)
    target = make_splits("mnist1d", data, classes=[0, 1, 2, 3, 4], train_size=args.labels, val_size=0.2,
                         augment=False)  # fmt: skip
    teacher = train_teacher(source.train, args)
    torch.manual_seed(args.seed)
    example = torch.stack([target.train[i][0] for i in range(2)])
    sites = [{"student": s, "taps": [f"t:{s}"]} for s in SITES]
    g = graftnet.graft(make_student(args), {"t": teacher}, {"sites": sites}, example_input=example)
    train = loader(target.train, args.batch_size, seed=args.seed)
    settings = {"lr": args.lr, "lambda1": {"final": 10.0}, "lambda2": 0.1, "cut_teachers_at": args.cut_at}
    objective = graftnet.KnowledgeFlow(g, settings, total_steps=args.epochs * len(train))
    assert source.test is not None and target.test is not None  # mnist1d has a test split
    return Setup(objective, train, loader(target.val, 256), loader(target.test, 256), example,
                 error(teacher, loader(source.test, 256)))  # fmt: skip


@dataclass
class Result:
    module: KnowledgeFlowModule
    trainer: pl.Trainer
    objective: graftnet.KnowledgeFlow
    student: nn.Module  # detached: the student's own class, no mixers or teachers
    forced: bool  # detached with force=True because some site still relied on the teacher
    teacher_error: float
    val_error: float
    test_error: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--samples", type=int, default=4000, help="MNIST-1D samples generated (all ten digits)")
    p.add_argument("--labels", type=int, default=100, help="labelled training samples of digits 0-4")
    p.add_argument("--width", type=int, default=32, help="channels of each conv layer (teacher and student)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--cut-at", type=float, default=0.7, help="fraction of the epochs after which teachers go")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (a smoke test: the cut may not be reached)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (these tiny convnets run fastest on one)")
    p.add_argument("--verbose", action="store_true", help="show Lightning's model summary and progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> Result:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory tensors need no workers
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teachers, on purpose
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    setup = build(args)
    module = KnowledgeFlowModule(setup.objective, setup.example)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, max_steps=args.max_steps or -1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=args.verbose,
                         enable_model_summary=args.verbose, log_every_n_steps=1,
                         callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, setup.train, setup.val)
    objective = module.objective
    try:
        student, forced = graftnet.detach(objective.model, tol=1e-3), False
    except graftnet.DetachError as e:  # only when training stopped before the cut (--max-steps)
        print(f"detaching with force=True; the student loses what the teacher still gave:\n{e}")
        student, forced = graftnet.detach(objective.model, force=True), True
    result = Result(module, trainer, objective, student, forced, setup.teacher_error,
                    error(student, setup.val), error(student, setup.test))  # fmt: skip
    print(f"teacher (digits 5-9) test error {100 * result.teacher_error:.2f}%")
    if objective.cut:
        print(f"teachers cut at epoch {module.cut_epoch}; min p_w(student) {module.p_w_start:.3f} at start, "
              f"{min(objective.dependence_at_cut.values()):.4f} at the cut")  # fmt: skip
    else:
        print("training stopped before the teacher cut")
    print(f"detached student alone (digits 0-4, {args.labels} labels): validation error "
          f"{100 * result.val_error:.2f}%, test error {100 * result.test_error:.2f}%")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
