"""Loop features of the update half: ``train.grad_accum_steps`` and ``train.ema_decay``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import relkd
from relkd.engine.ema import EMA
from relkd.engine.step import TrainStep
from relkd.registry import RelkdError
from tests.conftest import make_fmnist


class NoBN(nn.Module):
    """A student without batch norm (so a batch's gradient is the mean of per-sample ones)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _cfg(root: Path, out: Path, name: str, batch: int, **train) -> dict:
    return {
        "student": {"name": "nobn"},
        "method": {"name": "kd"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": batch,
                 "augment": False},
        "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 1, **train},
        "output_dir": str(out),
        "name": name,
    }  # fmt: skip


def _records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: str, name: str = "student.pt") -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir, name), weights_only=True)["model"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    # 144 training images: 4.5 batches of 32, so the last group of an epoch is a short one.
    return make_fmnist(tmp_path_factory.mktemp("fm144"), n_train=144, n_test=64)


def _teacher() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_of_b_over_k_equal_one_batch_of_b(root, tmp_path, k):
    """KD (per-sample terms) on a model without batch norm: ``grad_accum_steps=k`` at batch
    ``32/k`` trains the weights of batch 32 (up to float summation order), with the same lr
    sequence and optimizer-step count, the last short group of each epoch included."""
    one = relkd.train(_cfg(root, tmp_path, "one", 32), teacher=_teacher(), student=NoBN(),
                      quiet=True)  # fmt: skip
    acc = relkd.train(_cfg(root, tmp_path, f"acc{k}", 32 // k, grad_accum_steps=k),
                      teacher=_teacher(), student=NoBN(), quiet=True)  # fmt: skip
    r1, rk = _records(one["run_dir"]), _records(acc["run_dir"])
    assert [r["step"] for r in r1] == [r["step"] for r in rk] == [5, 10]  # ceil(144 / 32) a epoch
    assert [r["lr"] for r in r1] == [r["lr"] for r in rk]
    w1, wk = _weights(one["run_dir"]), _weights(acc["run_dir"])
    for name in w1:
        torch.testing.assert_close(wk[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = _weights(one["run_dir"])["fc.weight"] - NoBN().fc.weight.detach()
    assert moved.abs().max() > 1e-3  # it trained: the equality is not the initial weights'
    assert rk[-1]["train/loss"] == pytest.approx(r1[-1]["train/loss"], rel=0.05)


class CountingNoBN(NoBN):
    """:class:`NoBN` that counts the training forward passes (one per micro-batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.train_calls += 1
        return super().forward(x)


@pytest.mark.parametrize("k", [1, 2])
def test_max_steps_per_epoch_counts_optimizer_steps_and_global_batch_counts_k(root, tmp_path, k):
    """``train.max_steps_per_epoch=3``: 3 optimizer steps an epoch whatever k, i.e. 3*k
    micro-batches read (144 images at batch 16 are 9 batches, so the cap binds for k = 1, 2);
    run.json's ``global_batch`` is the samples of one optimizer step (16 x 1 process x k)."""
    student = CountingNoBN()
    cfg = _cfg(root, tmp_path, f"cap{k}", 16, grad_accum_steps=k, max_steps_per_epoch=3)
    res = relkd.train(cfg, teacher=_teacher(), student=student, quiet=True)
    assert [r["step"] for r in _records(res["run_dir"])] == [3, 6]  # optimizer steps, 2 epochs
    assert student.train_calls == 2 * 3 * k  # micro-batches
    session = json.loads(Path(res["run_dir"], "run.json").read_text())["sessions"][0]
    assert session["global_batch"] == 16 * k and session["world_size"] == 1


class _FakeDDP:
    """Counts the micro-batches that ran without a gradient all-reduce."""

    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield


def test_accumulation_steps_the_optimizer_every_k_calls_and_syncs_only_the_last():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def fwd(x, y, t_out):
        return model(x), {"ce": nn.functional.cross_entropy(model(x), y)}

    ddp = _FakeDDP()
    step = TrainStep(fwd, opt, state_module=model, accum_steps=3, ddp=ddp)
    counted = []
    step.after_update.append(lambda: counted.append(1))
    step.start_epoch(0, 0, batches=7)  # groups of 3, 3, 1
    stepped = []
    for _ in range(7):
        w = model.weight.detach().clone()
        step(torch.randn(5, 4), torch.randint(0, 2, (5,)))
        stepped.append(step.stepped)
        assert torch.equal(w, model.weight) != step.stepped  # weights move exactly at a step
    assert stepped == [False, False, True, False, False, True, True]
    assert ddp.entered == 4 and len(counted) == 3
    assert step.read().steps == 7  # the sums count micro-batches
    with pytest.raises(RelkdError, match=r"grad_accum_steps=2 with train\.on_nonfinite=skip"):
        TrainStep(fwd, opt, state_module=model, accum_steps=2, on_nonfinite="skip")


def test_ema_follows_the_formula_with_warm_up():
    lin = nn.Linear(3, 2)
    bn = nn.BatchNorm1d(2)
    mod = nn.Sequential(lin, bn)
    ema = EMA(mod, 0.9)
    ref = [t.detach().double().clone() for t in [*mod.parameters(), *mod.buffers()]]
    for u in range(12):
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(torch.randn_like(p))
        mod(torch.randn(4, 3))  # BN statistics and counter change too
        ema.update()
        d = min(0.9, (1 + u) / (10 + u))
        live = [*mod.parameters(), *mod.buffers()]
        for i, t in enumerate(live):
            ref[i] = d * ref[i] + (1 - d) * t.detach().double() if t.is_floating_point() else t
    for s, r in zip(ema.shadow, ref):
        torch.testing.assert_close(s.double(), r.double(), rtol=1e-6, atol=1e-6)
    assert int(ema.shadow[-1]) == int(bn.num_batches_tracked) == 12
    before = [t.detach().clone() for t in mod.parameters()]
    with ema.swapped() as m:
        assert torch.equal(m[0].weight, ema.shadow[0])
    assert all(torch.equal(a, b) for a, b in zip(before, mod.parameters()))  # restored exactly


def test_ema_is_evaluated_exported_and_resumed_exactly(fmnist_root, tmp_path, capsys):
    base = {
        "student": {"name": "cnn_tiny"}, "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 2,
                  "ema_decay": 0.9, "max_steps_per_epoch": 5},
        "output_dir": str(tmp_path),
    }  # fmt: skip
    full = relkd.train({**base, "name": "full"}, quiet=True)
    ckpt = torch.load(Path(full["run_dir"], "checkpoint.pt"), weights_only=False)
    assert ckpt["ema"]["updates"] == 10 == _records(full["run_dir"])[-1]["step"]
    student = relkd.create_model("cnn_tiny", 10, in_chans=1)
    names = [n for n, _ in student.named_parameters()] + [n for n, _ in student.named_buffers()]
    exported = _weights(full["run_dir"])
    raw = {
        k[len("student.") :]: v for k, v in ckpt["distiller"].items() if k.startswith("student.")
    }
    for name, shadow in zip(names, ckpt["ema"]["shadow"]):
        assert torch.equal(exported[name], shadow), name  # the export is the average ...
    assert not torch.equal(exported["fc.weight"], raw["fc.weight"])  # ... not the raw weights
    # what was evaluated is what was exported: relkd eval of student.pt gives the last top-1
    from relkd.cli import main

    capsys.readouterr()
    assert main(["eval", full["run_dir"], "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == full["last_top1"]
    # an interrupted run resumes the average exactly
    part = {**base, "name": "part"}
    relkd.train(part, overrides=["train.epochs=1"], quiet=True)
    resumed = relkd.train(part, resume=True, allow_change=["train.epochs"], quiet=True)
    wf, wr = _weights(full["run_dir"]), _weights(resumed["run_dir"])
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed["last_top1"] == full["last_top1"]


def test_the_new_keys_at_their_defaults_do_not_block_resuming_an_older_run(fmnist_root, tmp_path):
    import yaml

    cfg = {
        "student": {"name": "cnn_tiny"}, "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
        "train": {"epochs": 1, "progress": False, "tensorboard": False, "max_steps_per_epoch": 2},
        "output_dir": str(tmp_path), "name": "old",
    }  # fmt: skip
    res = relkd.train(cfg, quiet=True)
    recorded = Path(res["run_dir"], "config.yaml")
    old = yaml.safe_load(recorded.read_text())
    del old["train"]["ema_decay"], old["train"]["grad_accum_steps"]  # as relkd wrote it before
    recorded.write_text(yaml.safe_dump(old))
    relkd.train(cfg, resume=True, quiet=True)  # nothing refused, nothing to train
    with pytest.raises(RelkdError, match=r"train\.ema_decay"):
        relkd.train(cfg, resume=True, overrides=["train.ema_decay=0.5"], quiet=True)
