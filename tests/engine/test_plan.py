"""The planner (relkd.engine.plan): pipeline and teacher source from the methods' declarations,
the reason for every fallback, plan.json in the run folder, and the declarations themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import relkd
from relkd.engine.plan import make_plan
from relkd.methods import METHODS, Method, MethodContext, build_method, register_method
from relkd.methods.base import DECLARED_HOOKS
from relkd.registry import RelkdError


class _MemSet:
    """A data set with an in-memory form (what supports_in_memory looks for)."""

    def as_tensors(self):
        return torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)

    def __len__(self) -> int:
        return 4


class _FileSet:
    """A data set without an in-memory form and not replayable (no samples / transform)."""

    def __len__(self) -> int:
        return 4


class _Decl:
    """A method as the planner sees it: declarations only."""

    def __init__(self, extras=(), wraps=False, changes=False, taps=()):
        self.batch_extras, self.wraps_train_set, self.changes_batch = extras, wraps, changes
        self._taps = list(taps)

    def teacher_taps(self):
        return self._taps


def _plan(method, ds=None, **kw):
    kw.setdefault("has_teacher", True)
    return make_plan(method=method, method_name="m", train_ds=ds or _MemSet(), **kw)


def test_logit_method_on_in_memory_data_gets_the_exact_cache():
    p = _plan(_Decl(taps=["pooled"]), teacher_cache="auto")
    assert (p.pipeline, p.teacher, p.notes) == ("in-memory", "cache", [])
    p = _plan(_Decl(), teacher_cache=False)  # YAML's bare off
    assert (p.pipeline, p.teacher, p.notes) == ("in-memory", "online", [])
    p = _plan(_Decl(), has_teacher=False, teacher_cache="auto")
    assert (p.teacher, p.notes) == ("none", [])


@pytest.mark.parametrize(
    "decl,pipeline,reason",
    [
        (_Decl(taps=["layer2"]), "in-memory", "needs teacher features ['layer2']"),
        (_Decl(changes=True), "in-memory", "changes the batch (prepare_batch)"),
        (_Decl(wraps=True), "dataloader", "it needs the in-memory data pipeline"),
        (_Decl(extras=("pos",)), "dataloader", "it needs the in-memory data pipeline"),
    ],
)
def test_every_cache_fallback_says_why(decl, pipeline, reason):
    p = _plan(decl, teacher_cache="auto")
    assert (p.pipeline, p.teacher) == (pipeline, "online")
    assert len(p.notes) == 1 and reason in p.notes[0] and "teacher cache:" in p.notes[0]


def test_pipeline_declarations():
    p = _plan(_Decl(extras=("index",)))
    assert (p.pipeline, p.index, p.wrap_train_set) == ("in-memory", True, False)
    p = _plan(_Decl(wraps=True, extras=("index",)))
    assert (p.pipeline, p.index, p.wrap_train_set) == ("dataloader", True, True)
    p = _plan(_Decl(), in_memory="false")
    assert (p.pipeline, p.notes) == ("dataloader", [])
    p = _plan(_Decl(), ds=_FileSet())
    assert (p.pipeline, p.notes) == ("dataloader", [])


def test_in_memory_true_is_honoured_or_refused_or_explained():
    with pytest.raises(RelkdError, match=r"data\.in_memory=true but data set 'x'"):
        _plan(_Decl(), ds=_FileSet(), in_memory="true", data_name="x")
    p = _plan(_Decl(wraps=True), in_memory="true")
    assert p.pipeline == "dataloader"
    assert p.notes == ["data.in_memory=true: method 'm' wraps the train set; using a DataLoader"]


def test_every_replay_fallback_says_why():
    p = _plan(_Decl(), teacher_replay="auto")  # in-memory data: replay does not apply
    assert (p.pipeline, p.teacher) == ("in-memory", "online")
    assert "teacher replay: the data set runs on the in-memory pipeline" in p.notes[0]
    for decl, reason in [
        (_Decl(wraps=True), "wraps the train set itself"),
        (_Decl(extras=("pos",)), "needs the batch extras ['pos']"),
        (_Decl(taps=["layer1"]), "needs teacher features ['layer1']"),
        (_Decl(changes=True), "changes the batch"),
        (_Decl(), "is not a file-based image data set"),
    ]:
        p = _plan(decl, ds=_FileSet(), teacher_replay="auto")
        assert (p.pipeline, p.teacher) == ("dataloader", "online")
        assert len(p.notes) == 1 and reason in p.notes[0], (reason, p.notes)
    p = _plan(_Decl(), ds=_FileSet(), teacher_replay="auto", has_teacher=False)
    assert (p.teacher, p.notes) == ("none", [])


# --- the declarations --------------------------------------------------------------------------


@pytest.mark.parametrize("hook,flag", sorted(DECLARED_HOOKS.items()))
def test_an_undeclared_hook_override_is_refused_at_registration(hook, flag):
    body = {hook: lambda self, *a: a[0] if len(a) == 1 else a}
    cls = type("Sneaky", (Method,), body)
    with pytest.raises(TypeError, match=f"overrides {hook}.*{flag} = True"):
        register_method("sneaky_undeclared")(cls)
    assert "sneaky_undeclared" not in METHODS.names()
    declared = type("Honest", (Method,), {**body, flag: True})
    try:
        register_method("honest_declared")(declared)  # declared: accepted
    finally:
        METHODS._items.pop("honest_declared", None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_declares_exactly_the_hooks_it_overrides(name):
    cls = METHODS.get(name)
    for hook, flag in DECLARED_HOOKS.items():
        overrides = getattr(cls, hook) is not getattr(Method, hook)
        assert overrides == bool(getattr(cls, flag)), (name, hook, flag)


def test_a_composition_declares_the_union_of_its_parts():
    ctx = MethodContext(num_classes=10, student_shapes={"pooled": (8,), "logits": (10,)})
    ctx.teacher_shapes = dict(ctx.student_shapes)
    kd, _ = build_method("kd", ctx)
    assert not kd.wraps_train_set and not kd.changes_batch
    from relkd.methods.base import Composite

    class _Wrap(Method):
        wraps_train_set = True
        changes_batch = True
        batch_extras = ("pos",)

        def wrap_train_dataset(self, dataset):
            return dataset

        def prepare_batch(self, images, targets, extras):
            return images, targets, extras

    comp = Composite(ctx, {"kd": kd, "w": _Wrap(ctx)})
    assert comp.wraps_train_set and comp.changes_batch and comp.batch_extras == ("pos",)
    comp = Composite(ctx, {"kd": kd})
    assert not comp.wraps_train_set and not comp.changes_batch


# --- through fit ---------------------------------------------------------------------------------


def _cfg(root, out, name, method="kd", ckpt=None, **train):
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(ckpt)} if ckpt else None,
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 64},
        "train": {"epochs": 1, "progress": False, "tensorboard": False, "max_steps_per_epoch": 2,
                  **train},
        "output_dir": str(out),
        "name": name,
    }  # fmt: skip


def test_fit_saves_the_plan_and_prints_it_once(fmnist_root, tiny_teacher_ckpt, tmp_path, capsys):
    res = relkd.train(
        _cfg(fmnist_root, tmp_path, "p", "fitnet", tiny_teacher_ckpt, teacher_cache="auto")
    )
    plan = json.loads(Path(res["run_dir"], "plan.json").read_text())
    assert plan["pipeline"] == "in-memory" and plan["teacher"] == "online"
    assert len(plan["notes"]) == 1 and "needs teacher features" in plan["notes"][0]
    err = capsys.readouterr().err
    assert err.count("plan: data pipeline in-memory, teacher online; teacher cache:") == 1


def test_nothing_is_written_before_the_build_checks_pass(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path, "typo", "ce")
    cfg["method"]["args"] = {"tempreature": 4}
    with pytest.raises(RelkdError, match="tempreature"):
        relkd.train(cfg, quiet=True)
    assert not (tmp_path / "typo").exists()
    cfg = _cfg(fmnist_root, tmp_path, "mode", "ce", compile_mode="fastest")
    with pytest.raises(RelkdError, match=r"compile_mode='fastest'.*reduce-overhead"):
        relkd.train(cfg, quiet=True)
    cfg = _cfg(fmnist_root, tmp_path, "every", "ce", log_every=0)
    with pytest.raises(RelkdError, match="log_every=0"):
        relkd.train(cfg, quiet=True)
    assert not list(tmp_path.iterdir())
