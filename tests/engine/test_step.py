"""The engine's training step (relkd.engine.step): on-device sums equal the host sums exactly,
no host read per step, non-finite stop / skip, and skip leaves the model exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relkd
from relkd.engine.step import TrainStep
from relkd.registry import RelkdError

# --- a tiny distiller-shaped model ---------------------------------------------------------------


class _Net(nn.Module):
    """``(x, y, t_out) -> (logits, terms)`` with BatchNorm (running stats) and a buffer that the
    forward pass writes (like a memory bank)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("bank", torch.zeros(3))

    def forward(self, x, y, t_out=None, **extras):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        logits = self.fc(h)
        with torch.no_grad():
            self.bank.mul_(0.5).add_(logits.mean(0))
        terms = {"ce": F.cross_entropy(logits, y), "l2": 0.1 * logits.pow(2).mean()}
        return logits, terms


def _batches(n: int, bad: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(8, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        if i == bad:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")  # one NaN pixel: BN stats and the loss go NaN
        out.append((x, y))
    return out


def _state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    s = {f"m.{k}": v.clone() for k, v in net.state_dict().items()}
    for i, (_, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                s[f"opt.{i}.{k}"] = v.clone()
    return s


def _make(optim: str):
    torch.manual_seed(0)
    net = _Net()
    if optim == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    return net, opt


def test_sums_equal_host_float_sums_bit_for_bit():
    net, opt = _make("sgd")
    step = TrainStep(net, opt, method_name="toy")
    step.start_epoch(0, 0)
    host: dict[str, float] = {}
    for x, y in _batches(5):
        step(x, y, {})
    # the old engine: a host read of every term per step, summed as Python floats
    ref_net, ref_opt = _make("sgd")
    for x, y in _batches(5):
        _, terms = ref_net(x, y)
        loss = sum(t.float() for t in terms.values())
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        for k, v in terms.items():
            host[k] = host.get(k, 0.0) + float(v.detach())
        host["loss"] = host.get("loss", 0.0) + float(loss.detach())
    stats = step.read()
    assert stats.steps == 5 and stats.skipped == 0
    assert stats.sums == host  # exact: float64 device sums == Python float sums
    for a, b in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("bad", [0, 2])  # the very first step (no optimizer state yet) and later
def test_skip_leaves_model_buffers_and_optimizer_exactly_as_without_the_batch(optim, bad):
    net, opt = _make(optim)
    step = TrainStep(net, opt, on_nonfinite="skip", grad_clip=1.0)
    step.start_epoch(0, 0)
    for x, y in _batches(5, bad=bad):
        step(x, y)
    stats = step.read()
    assert stats.skipped == 1 and stats.steps == 4

    ref, ref_opt = _make(optim)
    ref_step = TrainStep(ref, ref_opt, grad_clip=1.0)
    ref_step.start_epoch(0, 0)
    for i, (x, y) in enumerate(_batches(5)):
        if i != bad:
            ref_step(x, y)
    a, b = _state(net, opt), _state(ref, ref_opt)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(torch.isfinite(v.float()).all() for v in a.values())
    assert stats.sums == ref_step.read().sums


def test_stop_raises_at_the_read_with_epoch_step_method_and_terms():
    net, opt = _make("sgd")
    step = TrainStep(net, opt, method_name="toy")
    step.start_epoch(4, 100)
    for x, y in _batches(4, bad=2):
        step(x, y)  # no host read: the bad step is only recorded
    with pytest.raises(RelkdError) as e:
        step.read()
    msg = str(e.value)
    assert "epoch 5 step 2 (global step 102)" in msg
    assert "'toy'" in msg and "ce=nan" in msg and "l2=nan" in msg
    assert "on_nonfinite=skip" in msg


def test_prepare_batch_teacher_and_dropped_extras_reach_the_right_callee():
    seen: dict[str, object] = {}

    def prepare(x, y, extras):
        return torch.cat([x, x]), torch.cat([y, y]), {**extras, "twice": True}

    def teacher(x, **extras):
        seen["teacher"] = (x.shape[0], sorted(extras))
        return "t-out"

    class M(_Net):
        def forward(self, x, y, t_out=None, **extras):
            seen["model"] = (x.shape[0], t_out, sorted(extras), x.is_contiguous())
            return super().forward(x[:, :1], y)

    net = M()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    step = TrainStep(
        net, opt, teacher=teacher, drop_extras=("aug",), prepare_batch=prepare,
        channels_last=True,
    )  # fmt: skip
    x, y = _batches(1)[0]
    x = x.repeat(1, 2, 1, 1)  # 2 channels: channels-last strides differ from contiguous ones
    step(x, y, {"aug": 1, "index": torch.arange(8)})
    assert seen["teacher"] == (16, ["aug", "index", "twice"])
    assert seen["model"][:3] == (16, "t-out", ["index", "twice"])
    assert seen["model"][3] is False  # channels-last input


def test_bad_options_are_refused():
    net, opt = _make("sgd")
    with pytest.raises(RelkdError, match=r"on_nonfinite='ignore'.*stop, skip"):
        TrainStep(net, opt, on_nonfinite="ignore")
    with pytest.raises(RelkdError, match="grad_clip=-1"):
        TrainStep(net, opt, grad_clip=-1)


# --- through fit: host reads and skip ------------------------------------------------------------

_READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy")


def _cfg(root, out, name, method="ce", ckpt=None, **train):
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(ckpt)} if ckpt else None,
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 16},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 1, "progress": False, "tensorboard": False, "seed": 1, **train},
        "output_dir": str(out),
        "name": name,
    }


@pytest.mark.parametrize(
    # CRD confirms its normalisation constant Z on the host in the first two steps (it is set
    # by the first one); the steady state after that has no read. (Its default other-class
    # negative sampler reads the host itself; "any" is the sampler without reads.)
    "method,mode,warm,args",
    [
        ("ce", "stop", 0, {}),
        ("kd", "stop", 0, {}),
        ("kd", "skip", 0, {}),
        ("crd", "stop", 2, {"negatives": "any"}),
    ],
)
def test_fit_reads_the_host_once_per_log_every_steps(
    method, mode, warm, args, fmnist_root, tiny_teacher_ckpt, tmp_path, monkeypatch
):
    """Count every tensor -> host read from the steady state's first step to the last step's
    end: none in the step, exactly one per ``train.log_every`` steps (the read point)."""
    reads = [0]
    calls: list[int] = []  # the read count at the start of each step call

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            reads[0] += 1
            return orig(self, *a, **k)

        return f

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    orig_call = TrainStep.__call__

    def call(self, *a, **k):
        calls.append(reads[0])
        out = orig_call(self, *a, **k)
        calls.append(reads[0])
        return out

    monkeypatch.setattr(TrainStep, "__call__", call)
    every = 4
    ckpt = None if method == "ce" else tiny_teacher_ckpt
    cfg = _cfg(fmnist_root, tmp_path, "r", method, ckpt, log_every=every, on_nonfinite=mode)
    cfg["method"]["args"] = args
    relkd.train(cfg, quiet=True)
    n = len(calls) // 2
    assert n == 16  # 256 samples / batch 16
    inside = [calls[2 * i + 1] - calls[2 * i] for i in range(warm, n)]
    assert inside == [0] * (n - warm)  # nothing in the step itself
    between = calls[-1] - calls[2 * warm]  # loader, schedule, read points after the steps
    points = [i for i in range(warm, n - 1) if (i + 1) % every == 0]  # the last: epoch end
    assert len(points) >= 3 and between == len(points)


class _PoisonOnce(nn.Module):
    """A BatchNorm student whose ``poison_at``-th training forward gets a NaN input: the forward
    pass writes NaN into the running statistics before the loss is known to be bad."""

    def __init__(self, poison_at: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(4, 10)
        self.poison_at, self.calls = poison_at, 0

    def forward(self, x):
        if self.training:
            if self.calls == self.poison_at:
                x = x * float("nan")
            self.calls += 1
        return self.fc(self.body(x))


def test_fit_skip_equals_a_run_without_the_bad_batch(fmnist_root, tmp_path):
    """The last batch of the epoch is poisoned and skipped: the exported student (BN buffers
    included), its accuracy and the losses equal a run that stops one batch earlier."""
    steps = 256 // 16
    a_student = _PoisonOnce(poison_at=steps - 1)
    # constant lr: the two runs' schedules do not depend on their different epoch lengths
    cfg_a = _cfg(fmnist_root, tmp_path, "a", on_nonfinite="skip", log_every=3)
    cfg_b = _cfg(fmnist_root, tmp_path, "b", max_steps_per_epoch=steps - 1, log_every=5)
    cfg_a["schedule"] = cfg_b["schedule"] = {"name": "constant"}
    a = relkd.train(cfg_a, student=a_student, quiet=True)
    b = relkd.train(cfg_b, student=_PoisonOnce(poison_at=None), quiet=True)
    assert a_student.calls == steps
    wa = torch.load(Path(a["run_dir"]) / "student.pt", weights_only=True)["model"]
    wb = torch.load(Path(b["run_dir"]) / "student.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and any("running_mean" in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert a["last_top1"] == b["last_top1"]
    ra, rb = (json.loads(Path(r["run_dir"], "metrics.jsonl").read_text()) for r in (a, b))
    assert ra["skipped_steps"] == 1 and "skipped_steps" not in rb
    assert ra["train/loss"] == rb["train/loss"]


def test_fit_stop_raises_before_eval_and_checkpoint(fmnist_root, tmp_path):
    student = _PoisonOnce(poison_at=5)
    with pytest.raises(RelkdError, match=r"epoch 1 step 5 \(global step 5\).*'ce'.*ce=nan"):
        relkd.train(_cfg(fmnist_root, tmp_path, "s", log_every=50), student=student, quiet=True)
    assert student.calls == 16  # found at the epoch-end read, no per-step host check
    run = tmp_path / "s"
    assert not (run / "checkpoint.pt").exists() and not (run / "student_best.pt").exists()
    assert (run / "metrics.jsonl").read_text() == ""


def test_a_failure_after_an_unread_bad_step_names_the_bad_step():
    class Fragile(_Net):
        def forward(self, x, y, t_out=None, **extras):
            if not torch.isfinite(self.fc.weight).all():  # e.g. a sampler given NaN weights
                raise RuntimeError("invalid multinomial distribution")
            return super().forward(x, y)

    torch.manual_seed(0)
    net = Fragile()
    step = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), method_name="toy")
    batches = _batches(4, bad=1)
    step(*batches[0])
    step(*batches[1])  # the bad one: recorded, the weights go NaN
    with pytest.raises(RelkdError, match=r"epoch 1 step 1 \(global step 1\) with method 'toy'"):
        step(*batches[2])


def test_fp16_skip_with_the_scaler_also_undoes_the_bad_forward_pass():
    """fp16 + GradScaler checks the loss on the host (the scaler syncs anyway); a skipped batch
    still leaves the BN statistics, the buffers, the optimizer and the scaler as before."""

    def run(bad):
        net, opt = _make("sgd")
        scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**4)
        amp = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
        step = TrainStep(net, opt, scaler=scaler, amp=amp, on_nonfinite="skip")
        for i, (x, y) in enumerate(_batches(4, bad=bad)):
            if bad is not None or i != 1:
                step(x, y)
        return _state(net, opt), scaler.state_dict(), step.read()

    a, sa, stats = run(bad=1)
    b, sb, ref = run(bad=None)
    assert stats.skipped == 1 and stats.steps == 3 and stats.sums == ref.sums
    assert sa == sb
    for k in a:
        assert torch.equal(a[k], b[k]), k
