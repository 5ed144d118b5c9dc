"""Linear-probe transfer evaluation of a trained student: ``relkd probe``.

The transfer protocol of RRD (Giakoumoglou & Stathaki, "Relational Representation
Distillation", arXiv 2407.12073; followed from CRD, Tian et al., arXiv 1910.10699): a student
distilled on CIFAR-100 is frozen, its pooled penultimate features (the input of its classifier)
feed a **new** ``nn.Linear`` head, and only that head is trained on the target data set
(STL-10 or Tiny-ImageNet in the paper; here any registered data set). Protocol defaults
(:data:`PROTOCOL`):

- images resized to 32x32; train augmentation RandomCrop(32, padding 4) + horizontal flip;
- head initialised N(0, 0.01) weights, zero bias;
- SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, 120 epochs, lr x0.1 at epochs
  30 / 60 / 90;
- top-1 on the target's test split after every epoch; best and last are reported (the official
  code's comment says its published numbers are the last epoch's).

Deliberate difference from the official code (github.com/giakoumoglou/distillers,
``transfer_student.py``): there the "frozen" backbone stays in train mode, so its BatchNorm
layers use batch statistics and keep updating their running statistics on the target data.
Here the backbone is in **eval mode** for the whole probe (running statistics from the source
data, never updated): the features are a fixed function of the image, which is what a linear
probe of a frozen representation means. ``probe.json`` records this.

Efficiency, honestly: the augmentation draws a new crop / flip every epoch, so train features
cannot be cached across epochs; the backbone runs forward (under ``no_grad``) on every train
batch. Test images are never augmented and the backbone is fixed, so the test features are
computed once and every epoch's evaluation is a head forward (exact). ``augment=False``
(``--no-augment``) also computes the train features once and then trains only the head on them,
which is fast but **deviates from the protocol** (no augmentation); the run records it.
File-based data sets whose train pipeline is exactly [Resize(s, s)] + RandomCrop(s, p) + flip +
ToTensor + Normalize (Tiny-ImageNet) are decoded and resized once into memory and augmented on the
device with the same distribution (``in_memory="auto"``).

Input statistics: the backbone sees the target's images normalised as it was trained, by the
rule ``relkd eval`` uses (:func:`relkd.models.input_check.attach_trained_input_norm`: the
statistics the module declares, else those recorded with the checkpoint, else the target data
set's own); ``probe.json``'s ``backbone_input`` says which. A relkd checkpoint records the
statistics of the data it was trained on, so a student trained on CIFAR-100 and probed on STL-10
sees the STL-10 images re-normalised to CIFAR-100's statistics (a note says so).

Run folder (``out_dir/name``): ``probe.json`` (the options, the protocol, the deviations),
``metrics.jsonl`` (one record per epoch), ``summary.json`` (best / last top-1) and ``head.pt``
(the trained head's weights).

Code layout: this module holds the protocol, :func:`fit_probe`, :func:`run_probe` and the CLI
(:data:`OPTIONS`, :func:`add_probe_parser`); :mod:`relkd.probe_model` the frozen backbone + head
(:class:`LinearProbe`, :func:`build_probe`); :mod:`relkd.probe_data` the train / evaluation
loaders and the feature extraction. Their public names stay importable from here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

# Kept importable from here: the public names (tests import eval_loader from here).
from relkd.probe_data import (  # noqa: F401
    eval_loader,
    extract_features,
    file_pipeline,
    materialize_file_split,
    train_loader_for,
)
from relkd.probe_model import (  # noqa: F401  (public names kept importable from here)
    LinearProbe,
    build_probe,
    head_optimizer,
    init_head,
)
from relkd.registry import RelkdError

PAPER = "RRD, Giakoumoglou & Stathaki, arXiv 2407.12073 (transfer: frozen backbone + linear head)"

#: The RRD linear-probe protocol (arXiv 2407.12073); :func:`run_probe`'s defaults.
PROTOCOL: dict[str, Any] = {
    "image_size": 32,
    "augment": True,
    "epochs": 120,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "milestones": [30, 60, 90],
    "gamma": 0.1,
    "batch_size": 64,
    "head_init_std": 0.01,
}

BN_NOTE = (
    "backbone in eval mode (BatchNorm running statistics frozen); the official code leaves it "
    "in train mode"
)
NO_AUGMENT_NOTE = (
    "augment=False: train features computed once without augmentation (deviates from the "
    "protocol's RandomCrop + flip)"
)


# ------------------------------------------------------------------------------ the training


def head_schedule(
    lr: float, steps_per_epoch: int, epochs: int, milestones: Sequence[int], gamma: float
):
    """The protocol's lr rule as the engine's schedule: ``lr x gamma`` at each milestone epoch
    (0-based epochs: milestone 30 = the 31st epoch onwards, as the official
    ``adjust_learning_rate`` with 1-based epochs), i.e. ``MultiStepLR`` stepped per epoch."""
    from relkd.engine.schedule import Schedule

    return Schedule(
        name="multistep", base_lr=lr, steps_per_epoch=steps_per_epoch, epochs=epochs,
        milestones=tuple(int(m) for m in milestones), gamma=gamma,
    )  # fmt: skip


def fit_probe(
    probe: LinearProbe,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    run_dir: str | os.PathLike[str],
    epochs: int = 120,
    lr: float = 0.05,
    milestones: Sequence[int] = (30, 60, 90),
    gamma: float = 0.1,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    num_workers: int = 4,
    eval_batch_size: int = 256,
    in_memory: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``probe.head`` on ``train_ds`` (backbone frozen), evaluate on ``test_ds`` every epoch.

    The head is trained by the engine's training step (:class:`relkd.engine.step.TrainStep`
    over a :class:`~relkd.engine.distiller.Distiller` of the head with method ``ce``: the loss
    is the cross-entropy of the head's logits [B, classes] on the features [B, D]) under the
    engine's schedule (:func:`head_schedule`). Writes ``metrics.jsonl`` and ``head.pt`` into
    ``run_dir`` (which must exist) and returns the summary (``best_top1``, ``best_epoch``,
    ``last_top1``, ...). With ``augment=True`` the backbone runs on every train batch (fresh
    crop / flip each epoch); with ``augment=False`` the train features are extracted once and
    the head is trained on them (``train_ds`` should then be built without augmentation). Test
    features are always extracted once (exact: no augmentation, fixed backbone).
    """
    from relkd.engine.build import build_step, seed_everything
    from relkd.engine.distiller import Distiller
    from relkd.engine.evaluation import evaluate
    from relkd.engine.plan import unpack
    from relkd.methods import MethodContext, build_method
    from relkd.models.checkpoint import save_student

    run_dir, device, head = Path(run_dir), torch.device(device), probe.head

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    def features_of(ds: Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.time()
        loader = eval_loader(ds, batch_size=eval_batch_size, device=device,
                              num_workers=num_workers, in_memory=in_memory)  # fmt: skip
        out = extract_features(probe, loader, device, progress=not quiet, desc=what)
        log(f"{what} {tuple(out[0].shape)} in {time.time() - t0:.1f}s")
        return out

    probe.to(device)
    probe.train()
    test_feats, test_y = features_of(test_ds, "test features")
    test_batches = list(zip(test_feats.split(4096), test_y.split(4096)))
    if augment:
        train_loader, loader_kind = train_loader_for(
            train_ds, batch_size=batch_size, seed=seed, device=device, num_workers=num_workers,
            in_memory=in_memory, log=log,
        )  # fmt: skip
        steps_per_epoch = len(train_loader)
    else:
        train_feats, train_y = features_of(train_ds, "train features (no augment)")
        train_loader, loader_kind = None, "cached_features"
        steps_per_epoch = math.ceil(len(train_feats) / batch_size)
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)

    # The engine's step over the head: Distiller(head, ce) adds the term "ce" = CE(logits, y)
    # (fp32), the step sums, checks, back-propagates and steps the head's SGD. The step does not
    # return the logits, so the model callable counts the train top-1 on the device.
    ce, _ = build_method("ce", MethodContext(num_classes=head.out_features))
    distiller = Distiller(head, ce, ce_weight=1.0).to(device)
    opt = head_optimizer(probe, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = head_schedule(lr, steps_per_epoch, epochs, milestones, gamma)
    correct = torch.zeros((), dtype=torch.float64, device=device)

    def model(x, y, t_out, **extras):
        logits, terms = distiller(x, y, t_out, **extras)
        correct.add_((logits.detach().argmax(1) == y).sum())
        return logits, terms

    train_step = build_step(model, distiller, opt, device=device, method_name="linear probe (ce)")

    (run_dir / "metrics.jsonl").write_text("")
    history: list[dict[str, Any]] = []
    best = {"top1": -1.0, "epoch": -1}
    t_start = time.time()
    step = 0
    for epoch in range(epochs):
        seed_everything(seed * 1_000_003 + epoch)
        probe.train()
        t_ep = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct.zero_()
        seen = 0
        if train_loader is not None:
            train_loader.set_epoch(epoch)
            batches: Any = (unpack(b, device)[:2] for b in train_loader)
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(train_feats), generator=g).to(device)
            batches = ((train_feats[i], train_y[i]) for i in order.split(batch_size))
        train_step.start_epoch(epoch, step)
        for i, (x, y) in enumerate(batches):
            if i >= steps_per_epoch:
                break
            feats = probe.features(x) if train_loader is not None else x
            schedule.apply(opt, step)
            loss_sum += train_step(feats, y) * len(y)
            step += 1
            seen += len(y)
        train_step.read()  # raises on a non-finite loss of the epoch, naming its step
        ev = evaluate(head, test_batches, device)  # the engine's top-1 / top-5 / CE
        if ev["top1"] > best["top1"]:
            best = {"top1": ev["top1"], "epoch": epoch + 1}
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": schedule.lr(epoch * steps_per_epoch),  # constant within an epoch
            "train/loss": float(loss_sum) / max(1, seen),
            "train/top1": 100.0 * float(correct) / max(1, seen),
            **ev,
            "best_top1": best["top1"],
            "epoch_time_s": time.time() - t_ep,
        }
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(
            f"probe epoch {epoch + 1}/{epochs} loss {record['train/loss']:.4f} "
            f"top1 {ev['top1']:.2f} best {best['top1']:.2f}"
        )
    save_student(head, run_dir / "head.pt")
    last = history[-1]
    return {
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "last_top1": last["top1"],
        "last_top5": last["top5"],
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "feature_dim": head.in_features,
        "num_classes": head.out_features,
        "num_train": len(train_ds),  # type: ignore[arg-type]
        "num_test": len(test_feats),
        "augment": augment,
        "train_data_path": loader_kind,
        "backbone_mode": "eval",
        "train_time_s": time.time() - t_start,
        "run_dir": str(run_dir),
    }


def run_probe(
    model_name: str,
    checkpoint: str,
    data: str,
    root: str | None,
    *,
    num_source_classes: int,
    image_size: int | None = 32,
    epochs: int = 120,
    lr: float = 0.05,
    milestones: Sequence[int] = (30, 60, 90),
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    augment: bool = True,
    device: str = "auto",
    seed: int = 0,
    out_dir: str = "runs/probe",
    max_steps_per_epoch: int | None = None,
    quiet: bool = False,
    momentum: float = 0.9,
    gamma: float = 0.1,
    name: str | None = None,
    num_workers: int = 4,
    eval_batch_size: int = 256,
    in_memory: str = "auto",
    model_kwargs: Mapping[str, Any] | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Linear-probe transfer of a trained student, the RRD protocol (arXiv 2407.12073).

    The options are those of ``relkd probe`` (:data:`OPTIONS` says what each does); the
    defaults are the protocol's (:data:`PROTOCOL`). Notes: ``checkpoint`` is any file
    :func:`relkd.models.load_checkpoint` reads (``relkd train``'s ``student.pt``, a RepDistiller
    ``{"model": sd}`` file, a bare state dict), loaded strictly; ``image_size`` None or 0 keeps
    the data set's own size (fixed-size sets such as fashion_mnist); ``augment=False`` extracts
    the train features once (fast, **not** the protocol); the run folder is ``out_dir/name``
    (default name ``<data>_<model>_s<seed>``) and a finished run there is an error unless
    ``overwrite``; ``quiet``: no progress bars or lines on stderr.

    Returns:
        the summary (also written to ``summary.json``): ``best_top1``, ``last_top1``,
        ``best_epoch``, ``last_top5``, ``run_dir``, the data and model names, timings.
    """
    # The options as called (recorded in probe.json; fit_probe takes its share of them).
    options = {"model": model_name, **locals()}
    for k in ("model_name", "quiet", "overwrite"):
        del options[k]
    from relkd.data import build_datasets
    from relkd.engine.build import resolve_device, seed_everything

    milestones = [int(m) for m in milestones]
    for ok, msg in (
        (isinstance(epochs, int) and epochs >= 1, f"epochs must be >= 1, got {epochs!r}"),
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {eval_batch_size}"),
        (lr > 0, f"lr must be > 0, got {lr}"),
        (weight_decay >= 0 and momentum >= 0, "weight_decay and momentum must be >= 0"),
        (0 < gamma <= 1, f"gamma must be in (0, 1], got {gamma}"),
        (all(m >= 1 for m in milestones) and milestones == sorted(milestones),
         f"milestones must be increasing epochs >= 1, got {milestones}"),
        (max_steps_per_epoch is None or max_steps_per_epoch >= 1,
         f"max_steps_per_epoch must be >= 1 (or unset), got {max_steps_per_epoch}"),
        (in_memory in ("auto", "true", "false"),
         f"in_memory must be auto|true|false, got {in_memory!r}"),
        (isinstance(num_source_classes, int) and num_source_classes >= 1,
         f"num_source_classes must be a positive int, got {num_source_classes!r}"),
    ):  # fmt: skip
        if not ok:
            raise RelkdError(msg)
    image_size = image_size or None
    dev = resolve_device(device)
    run_dir = Path(out_dir) / (name or f"{data}_{model_name.replace(':', '-')}_s{seed}")
    if (run_dir / "summary.json").exists() and not overwrite:
        raise RelkdError(
            f"run folder {str(run_dir)!r} already holds a finished probe; pass --overwrite "
            "(overwrite=True) or choose another --out / --name"
        )
    options.update(
        image_size=image_size, milestones=milestones, device=str(dev), name=run_dir.name,
        out_dir=str(out_dir), checkpoint=str(checkpoint), model_kwargs=dict(model_kwargs or {}),
    )  # fmt: skip
    options = {k: options[k] for k in OPTIONS if k in options}  # in the order of OPTIONS

    train_ds, test_ds, info = build_datasets(
        data, root, download=download, augment=augment, image_size=image_size
    )
    seed_everything(seed)
    probe = build_probe(
        model_name, checkpoint, num_source_classes=num_source_classes,
        num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
        model_kwargs=model_kwargs, init_std=PROTOCOL["head_init_std"],
    )  # fmt: skip
    # The frozen backbone sees the target's images normalised as it was trained, by relkd
    # eval's rule (its declared statistics, else those recorded with the checkpoint, else the
    # target's own): a re-normalising hook on the backbone, none when they are the target's.
    from relkd.models.input_check import attach_trained_input_norm

    backbone_input, notes = attach_trained_input_norm(
        probe.backbone, model_name, checkpoint, None, None, info
    )
    differs = {k: options[k] for k in PROTOCOL if k in options and options[k] != PROTOCOL[k]}
    deviations = [BN_NOTE] + [NO_AUGMENT_NOTE] * (not augment)
    if max_steps_per_epoch:
        deviations.append(f"max_steps_per_epoch={max_steps_per_epoch} (truncated epochs)")
    if differs:
        deviations.append(f"settings differ from the protocol: {differs}")
    meta = {
        "paper": PAPER, "protocol": PROTOCOL, "options": options,
        "target": {
            "name": info.name, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
            "crop_padding": info.crop_padding,
        },
        "feature_dim": probe.head.in_features, "backbone_mode": "eval",
        "backbone_input": backbone_input,
        "matches_protocol": not differs and augment and not max_steps_per_epoch,
        "deviations": deviations, "torch": torch.__version__,
    }  # fmt: skip
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)
        (run_dir / "probe.json").write_text(json.dumps(meta, indent=2))
    except OSError as e:
        raise RelkdError(f"cannot write the run folder {str(run_dir)!r}: {e}") from e
    if not quiet:
        for note in notes:
            print(f"relkd probe: note: {note}", file=sys.stderr, flush=True)
        print(
            f"probe {model_name} ({checkpoint}) -> {info.name}: {len(train_ds)} train / "  # type: ignore[arg-type]
            f"{len(test_ds)} test images at {info.image_size}px, {info.num_classes} classes, "  # type: ignore[arg-type]
            f"feature dim {probe.head.in_features}, device {dev}",
            file=sys.stderr,
            flush=True,
        )
    fit_kw = {k: options[k] for k in _FIT_OPTIONS}
    summary = fit_probe(
        probe, train_ds, test_ds, run_dir=run_dir, device=dev, quiet=quiet, **fit_kw
    )
    summary.update(
        model=model_name, checkpoint=str(checkpoint), data=info.name, seed=seed,
        matches_protocol=meta["matches_protocol"],
    )  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


#: The options :func:`run_probe` hands on to :func:`fit_probe`.
_FIT_OPTIONS = (
    "epochs", "lr", "milestones", "gamma", "batch_size", "momentum", "weight_decay", "augment",
    "seed", "max_steps_per_epoch", "num_workers", "eval_batch_size", "in_memory",
)  # fmt: skip


# ----------------------------------------------------------------------------------- the CLI

#: Every probe option: ``key -> (type, help)``. The keys a probe YAML (``configs/transfer``) may
#: set and the ``relkd probe`` flags (``--key-with-dashes``, except where :data:`_FLAGS` says
#: otherwise) both come from here; the defaults are :func:`run_probe`'s.
OPTIONS: dict[str, tuple[type, str]] = {
    "model": (str, "student zoo name (e.g. wrn_16_2) or import path (mypkg.models:Net)"),
    "checkpoint": (str, "student weights (student.pt, ...)"),
    "data": (str, "target data set: stl10, tiny_imagenet, ..."),
    "root": (str, "target data root (default: its cache location)"),
    "num_source_classes": (int, "classifier width of the checkpoint (100 for CIFAR-100 students)"),
    "image_size": (int, "resize the target images to this side (0: the data set's own size)"),
    "epochs": (int, "head training epochs"),
    "lr": (float, "the head's SGD lr"),
    "milestones": (list, "lr x gamma at these epochs (comma-separated)"),
    "gamma": (float, "lr decay factor"),
    "batch_size": (int, "train batch size"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "SGD weight decay"),
    "augment": (bool, "no crop / flip: extract the train features once and train the head on "
                      "them (fast; deviates from the protocol)"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "seed": (int, "head init, shuffle and augmentation seed"),
    "out_dir": (str, "output folder"),
    "name": (str, "run folder name (default <data>_<model>_s<seed>)"),
    "max_steps_per_epoch": (int, "cap the train steps per epoch (smoke tests)"),
    "num_workers": (int, "DataLoader workers"),
    "eval_batch_size": (int, "batch size of feature extraction"),
    "in_memory": (str, "on-device train batches where possible"),
    "model_kwargs": (dict, "extra model factory argument, e.g. in_chans=3 (repeatable)"),
    "download": (bool, "download missing data"),
    "overwrite": (bool, "replace a finished run's folder"),
}  # fmt: skip
#: Flags that are not ``--key`` with a value: key -> (flag, argparse keywords).
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "augment": ("--no-augment", {"action": "store_false"}),
    "out_dir": ("--out", {}),
    "model_kwargs": ("--model-arg", {"dest": "model_arg", "action": "append",
                                     "metavar": "KEY=VALUE"}),
    "download": ("--download", {"action": "store_true"}),
    "overwrite": ("--overwrite", {"action": "store_true"}),
    "in_memory": ("--in-memory", {"choices": ["auto", "true", "false"]}),
}  # fmt: skip
#: Kept for callers of the first version: key -> type.
CONFIG_KEYS: dict[str, Any] = {k: t for k, (t, _) in OPTIONS.items()}
_REQUIRED = ("model", "checkpoint", "data", "num_source_classes")


def load_probe_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a probe YAML: a flat mapping of :data:`OPTIONS` keys (``null`` = the default)."""
    import yaml

    from relkd._yaml import strict_load

    p = Path(path)
    if not p.is_file():
        raise RelkdError(f"probe config {str(p)!r} does not exist")
    try:
        raw = strict_load(p.read_text()) or {}  # yes / on are strings, as in config files
    except yaml.YAMLError as e:
        raise RelkdError(f"probe config {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RelkdError(f"probe config {str(p)!r} must be a mapping of options")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in OPTIONS:
            raise RelkdError(
                f"probe config {str(p)!r}: unknown key {k!r}; valid keys: {', '.join(OPTIONS)}"
            )
        if v is None:
            continue
        want = OPTIONS[k][0]
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if want is list and isinstance(v, (int, str)):
            v = _parse_milestones(str(v))
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            what = "true or false" if want is bool else want.__name__
            raise RelkdError(f"probe config {str(p)!r}: {k} must be {what}, got {v!r}")
        out[k] = v
    return out


def _parse_milestones(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise RelkdError(f"milestones must be comma-separated epochs, got {text!r}") from e


def _parse_model_arg(text: str) -> tuple[str, Any]:
    from relkd._yaml import strict_load  # yes / on stay strings, as in the config YAML

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, strict_load(value)


def probe_options(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`run_probe` from parsed flags: protocol defaults, then the
    ``--config`` YAML, then the flags given on the command line."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    cfg_path = given.pop("config", None)
    for k in ("fn", "cmd"):
        given.pop(k, None)
    opts: dict[str, Any] = load_probe_config(cfg_path) if cfg_path else {}
    model_args = given.pop("model_arg", None)
    if model_args:
        opts["model_kwargs"] = {**opts.get("model_kwargs", {}), **dict(model_args)}
    opts.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in _REQUIRED if opts.get(k) is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise RelkdError(f"relkd probe needs {flags} (as flags or in the --config YAML)")
    opts["model_name"] = opts.pop("model")
    opts.setdefault("root", None)
    unknown = set(opts) - set(OPTIONS) - {"model_name", "quiet"}
    if unknown:  # a flag added to the parser but not to OPTIONS
        raise RelkdError(f"unknown probe options: {sorted(unknown)}")
    return opts


def _cmd_probe(args: argparse.Namespace) -> int:
    summary = run_probe(**probe_options(args))
    print(json.dumps(summary, indent=2))
    return 0


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``relkd probe`` on ``subparsers`` (from ``add_subparsers``) and return it.

    One flag per :data:`OPTIONS` key. Unset flags stay absent (``argparse.SUPPRESS``) so that a
    ``--config`` YAML fills them and given flags override it; :func:`probe_options` merges.
    """
    import inspect

    p = subparsers.add_parser(
        "probe",
        help="linear-probe transfer of a trained student (RRD protocol, arXiv 2407.12073)",
        description=(
            "Freeze a trained student (eval mode), train a new linear head on its pooled "
            "features on a target data set and report the best / last test top-1. Defaults are "
            "the RRD transfer protocol (arXiv 2407.12073): 32x32 images, RandomCrop(32, pad 4) + "
            "flip, SGD lr 0.05 momentum 0.9 wd 5e-4, batch 64, 120 epochs, lr x0.1 at 30/60/90. "
            "Options come from --config FILE (configs/transfer/*.yaml), flags override it."
        ),
    )
    p.add_argument("--config", default=None, help="probe YAML (e.g. configs/transfer/stl10.yaml)")
    defaults = {k: v.default for k, v in inspect.signature(run_probe).parameters.items()}
    parse = {int: int, float: float, str: str, list: _parse_milestones, dict: _parse_model_arg}
    for key, (kind, text) in OPTIONS.items():
        flag, kw = _FLAGS.get(key, ("--" + key.replace("_", "-"), {}))
        default = defaults.get(key, inspect.Parameter.empty)
        if kind is not bool and default not in (inspect.Parameter.empty, None):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default {shown})"
        if "action" not in kw or kw["action"] == "append":
            kw = {"type": parse[kind], **kw}
        p.add_argument(flag, dest=kw.pop("dest", key), default=argparse.SUPPRESS, help=text, **kw)
    p.add_argument("--quiet", action="store_true", default=False, help="no progress on stderr")
    p.set_defaults(fn=_cmd_probe)
    return p
