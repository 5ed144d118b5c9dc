"""Any relkd method in your own training loop: :class:`Distillation`.

``Distillation(method, student, teacher, example_input=x)`` builds the method's trainable module
with every feature shape measured for you (one no-grad forward pass of each model on a batch of
the input's shape), and ``distill(images, targets, **extras)`` returns the loss to call
``backward`` on, the student's logits and each (already weighted) loss term. The module holds the
student and the method's extras (projections, memories); the teacher is kept frozen beside it,
outside ``parameters()`` and ``state_dict()``, so an optimizer built from
``distill.parameters()`` trains exactly what the method trains. In the spirit of timm's
distillation task (a task object whose forward returns the loss terms), for every relkd method::

    distill = relkd.Distillation("kd", student, teacher, example_input=next(iter(loader))[0])
    opt = torch.optim.SGD(distill.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        out = distill(x, y)
        opt.zero_grad(); out.loss.backward(); opt.step()

Methods that need per-sample extras say so in :attr:`Distillation.batch_extras`; wrap the training
set with :meth:`Distillation.wrap_dataset` and pass the batch's extras dict on:
CRD / RRD read the sample ``index`` (give ``num_train_samples=len(train_set)``), CORSD reads
triplets. Multi-stage methods (FitNet's hint stage, AB / FT / FSP initialisation) list their
pre-training phases in :meth:`Distillation.phases`; call :meth:`set_phase` / :meth:`set_epoch`
as the engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from relkd.registry import RelkdError


@dataclass
class DistillationOutput:
    """What :meth:`Distillation.forward` returns.

    Attributes:
        loss: scalar fp32, the sum of ``terms`` (call ``backward`` on it).
        logits: the student's logits [B', C] (B' = the batch the method trained on: 3B for
            CORSD's triplets, B otherwise).
        targets: the labels [B'] matching ``logits`` (for accuracy bookkeeping).
        terms: name -> already-weighted scalar loss (``"ce"`` = cross-entropy with the labels).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def _example(x: torch.Tensor | tuple[int, ...] | list[int]) -> torch.Tensor:
    """A zero batch of 2 with the example's per-sample shape (2: BatchNorm and relation methods
    need more than one row; zeros: nothing of the user's data leaks into the probe)."""
    if torch.is_tensor(x):
        shape = tuple(x.shape[1:]) if x.dim() >= 2 else ()
    else:
        shape = tuple(int(s) for s in x)
    if len(shape) < 1:
        raise RelkdError(
            f"example_input must be a batch [B, C, H, W] or a per-sample shape (C, H, W); got "
            f"{tuple(x.shape) if torch.is_tensor(x) else x!r}"
        )
    return torch.zeros(2, *shape)


def _input_norm(
    models: dict[str, tuple[nn.Module | None, Any, Any]], data_mean: Any, data_std: Any
) -> dict[str, str]:
    """Attach each model's input re-normalisation as :func:`relkd.train` does (one rule for
    every entry point: :mod:`relkd.models.normalization`); returns what each model sees."""
    import warnings

    from relkd.models.normalization import (
        attach_input_norm,
        describe_input_norm,
        input_norm_source,
    )

    if (data_mean is None) != (data_std is None):
        raise RelkdError("give both data_mean and data_std (your loader's statistics), or neither")
    out: dict[str, str] = {}
    for role, (model, mean, std) in models.items():
        if model is None:
            continue
        if data_mean is not None:
            attach_input_norm(model, data_mean, data_std, mean, std)
            out[role] = describe_input_norm(model, data_mean, data_std, mean, std)
            continue
        own, source = input_norm_source(model, mean, std)
        if own is not None:
            warnings.warn(
                f"relkd.Distillation: the {role}'s input statistics are {source} (mean "
                f"{own[0]}, std {own[1]}) but data_mean / data_std were not given, so its inputs "
                "are fed unchanged; pass the statistics your loader normalises with, as "
                "relkd.train does with the data set's",
                stacklevel=3,
            )
            out[role] = f"unchanged: data statistics not given (the model's are {source})"
        else:
            out[role] = "unchanged: data statistics not given"
    return out


class _WithExtras(torch.utils.data.Dataset):
    """Items ``(x, y)`` as ``(x, y, {})``: one loop shape for every method."""

    def __init__(self, ds: Any) -> None:
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, dict[str, Any]]:
        item = self.dataset[i]
        return item[0], item[1], dict(item[2]) if len(item) > 2 else {}


class Distillation(nn.Module):
    """A relkd method ready for any training loop.

    Args:
        method: a registered method (``relkd.list_methods()``) or a composition ``"rrd+kd"``.
        student: the model to train, any ``nn.Module`` returning logits [B, C] (features are
            tapped by module name; see ``relkd.models.FeatureTap``).
        teacher: the trained teacher (frozen here: eval mode, ``requires_grad=False``), or
            None for methods without one (``ce``, CORSD's self-distillation).
        example_input: a batch [B, C, H, W] of real inputs (only its shape is used) or a
            per-sample shape ``(C, H, W)``; the models see a zero batch of that shape once.
        num_classes: checked against the student's logits (default: measured from them).
        ce_weight: weight of the cross-entropy term (default: the method's, e.g. 0.1 for KD).
        epochs: the length of your run in epochs, if known: a method schedule longer than it
            (DKD's loss warm-up, a pre-training phase) is then said once as a warning.
        num_train_samples: size of the training set, for per-sample memories (CRD).
        seed: seed of data-side draws (CORSD's triplets).
        data_mean, data_std: the statistics your loader normalises images with (one value per
            channel). With them each model sees inputs normalised as it was trained, by the rule
            of :func:`relkd.train`: ``teacher_mean`` / ``teacher_std`` (``student_*``) if given,
            else the statistics the model declares (``input_mean`` / ``input_std``, a
            torchvision weights enum's, timm's ``pretrained_cfg``), else the data's (nothing
            changes). :attr:`input_norm` says which each model got. Without them inputs reach
            the models unchanged, and a model that declares other statistics is warned about.
        teacher_mean, teacher_std, student_mean, student_std: a model's statistics, given.
        **method_args: the method's keyword arguments (e.g. ``temperature=4.0``); for a
            composition, one dict per part (``rrd={"queue_size": 4096}``).

    Raises:
        RelkdError: unknown method or argument, a method that needs a missing teacher, class
            counts that disagree, an input the models cannot run on.
    """

    def __init__(
        self,
        method: str,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        example_input: torch.Tensor | tuple[int, ...],
        num_classes: int | None = None,
        ce_weight: float | None = None,
        epochs: int | None = None,
        num_train_samples: int = 0,
        seed: int = 0,
        data_mean: Sequence[float] | None = None,
        data_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        **method_args: Any,
    ) -> None:
        super().__init__()
        import warnings

        from relkd.engine.build import build_method_parts
        from relkd.methods.spec import MethodScheduleWarning, MethodSpec

        spec = MethodSpec.parse(method, method_args)
        spec.check()
        for note in spec.schedule_notes(epochs) if epochs is not None else ():
            warnings.warn(note, MethodScheduleWarning, stacklevel=2)
        dummy = _example(example_input)
        #: model ("teacher" / "student") -> the input statistics it sees, in words.
        self.input_norm: dict[str, str] = _input_norm(
            {"student": (student, student_mean, student_std),
             "teacher": (teacher, teacher_mean, teacher_std)},
            data_mean, data_std,
        )  # fmt: skip
        parts = build_method_parts(
            method, student, teacher, dummy, method_args=method_args, ce_weight=ce_weight,
            num_classes=num_classes, num_train_samples=num_train_samples, seed=seed,
            teacher_hint="pass teacher=<trained model>",
        )  # fmt: skip
        self.method_name = method
        self.ce_weight = parts.ce_weight
        self.distiller = parts.distiller
        # Not a submodule (Teacher is no nn.Module): never in parameters(), state_dict(), DDP.
        self._teacher = parts.teacher

    # ------------------------------------------------------------------ what a loop needs
    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    @property
    def method(self) -> nn.Module:
        """The method module (its extras: projections, memories, relation nets)."""
        return self.distiller.method

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher.model if self._teacher is not None else None

    @property
    def batch_extras(self) -> tuple[str, ...]:
        """Per-sample extras the method reads (``("index",)`` for CRD / RRD); delivered by
        :meth:`wrap_dataset`."""
        return tuple(self.method.batch_extras)

    def wrap_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """The training set as this method needs it, items ``(x, y, extras: dict)``.

        CRD / RRD: ``extras["index"]`` = the sample's index; CORSD: a triplet (positive and
        negative samples). torch's default collate batches the extras dict, so the loop is
        ``for x, y, extras in loader: distill(x, y, **extras)`` for every method.
        """
        from relkd.data import IndexedDataset

        ds = self.method.wrap_train_dataset(dataset)
        if "index" in self.batch_extras:
            ds = IndexedDataset(ds)
        return _WithExtras(ds)

    def phases(self) -> list[tuple[str, int]]:
        """Pre-training phases ``[(name, epochs), ...]`` to run before the main schedule."""
        return list(self.method.phases())

    def set_phase(self, phase: str) -> None:
        """Enter a pre-training phase by name, or ``"main"`` (no CE during a phase)."""
        self.method.set_phase(phase)

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch of the main schedule (methods with epoch-dependent weights)."""
        self.method.set_epoch(epoch)

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor, **extras: Any
    ) -> DistillationOutput:
        """One batch: images [B, C, H, W], targets [B] (int64), the batch's extras.

        The teacher runs without gradients on the same images; returns a
        :class:`DistillationOutput` whose ``loss`` is the sum of the weighted terms.
        """
        from relkd.engine.step import forward_loss

        out = forward_loss(
            self.distiller, images, targets, extras, teacher=self._teacher,
            prepare_batch=self.method.prepare_batch, method_name=self.method_name,
        )  # fmt: skip
        return DistillationOutput(
            loss=out.loss, logits=out.logits, targets=out.targets, terms=out.terms
        )

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() move the frozen teacher along with the student.
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher.model._apply(fn)
        return self

    def remove_hooks(self) -> None:
        """Detach the feature taps from the student and teacher (the models work as before)."""
        self.distiller.tap.remove()
        if self._teacher is not None:
            self._teacher.tap.remove()
