"""relkd.Distillation: a relkd method trained from a plain PyTorch loop that is not relkd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import relkd
from relkd import RelkdError


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    """A learnable 10-class set of 1 x 28 x 28 images (class = grating orientation)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    a = torch.pi * y.float() / 10
    phase = torch.rand(n, generator=g) * 6.28
    img = torch.sin(
        0.9 * (a.cos()[:, None, None] * xx + a.sin()[:, None, None] * yy) + phase[:, None, None]
    )
    x = img[:, None] + 0.3 * torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(x, y)


def _models():
    torch.manual_seed(0)
    teacher = relkd.create_model("cnn_small", 10, in_chans=1)
    student = relkd.create_model("cnn_tiny", 10, in_chans=1)
    return teacher, student


def _user_loop(distill: relkd.Distillation, ds, steps: int = 3, batch: int = 16):
    """The README's loop: the user's DataLoader, optimizer and step, nothing of relkd's engine."""
    loader = DataLoader(distill.wrap_dataset(ds), batch_size=batch, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(distill.parameters(), lr=0.05, momentum=0.9)
    outs = []
    distill.train()
    for epoch in range(2):
        distill.set_epoch(epoch)
        for i, (x, y, extras) in enumerate(loader):
            if i >= steps:
                break
            out = distill(x, y, **extras)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            outs.append(out)
    return opt, outs


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("kd", {}),
        ("crd", {"nce_k": 32}),  # reads the sample index extra
        ("rrd", {"queue_size": 64}),
        ("fitnet", {}),
        ("corsd", {}),  # self-distillation: no teacher
    ],
)
def test_a_method_trains_from_a_plain_loop(method, kwargs):
    teacher, student = _models()
    ds = _data()
    use_teacher = method != "corsd"
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = [p.detach().clone() for p in student.parameters()]
    distill = relkd.Distillation(
        method,
        student,
        teacher if use_teacher else None,
        example_input=ds[0][0][None],
        num_train_samples=len(ds),
        **kwargs,
    )
    assert ("index" in distill.batch_extras) == (method == "crd")  # CRD's per-sample memory
    opt, outs = _user_loop(distill, ds)
    assert len(outs) == 6
    for out in outs:
        assert torch.isfinite(out.loss)
        assert out.loss.item() == pytest.approx(
            sum(float(t.detach()) for t in out.terms.values()), rel=1e-5
        )
        assert out.logits.shape == (out.targets.shape[0], 10)
        assert "ce" in out.terms and len(out.terms) >= 2  # CE plus the method's own terms
    if method == "corsd":  # a batch of 16 triplets = 48 images
        assert outs[0].logits.shape[0] == 48
    # The optimizer holds the student and the method's extras, never the teacher.
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in student.parameters())
    assert not any(id(p) in in_opt for p in teacher.parameters())
    extras = list(distill.method.parameters())
    if method != "kd":
        assert extras and all(id(p) in in_opt for p in extras)
    assert not any(k.startswith("teacher") for k in distill.state_dict())
    # The student learned, the teacher is untouched and frozen.
    assert any(not torch.equal(a, b.detach()) for a, b in zip(s_before, student.parameters()))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    if use_teacher:
        assert not any(p.requires_grad for p in teacher.parameters())


def test_kd_terms_are_the_formula():
    teacher, student = _models()
    ds = _data(32)
    distill = relkd.Distillation("kd", student, teacher, example_input=(1, 28, 28))
    x, y = ds.tensors[0][:8], ds.tensors[1][:8]
    distill.eval()  # no BN update: the reference forward sees the same models
    out = distill(x, y)
    with torch.no_grad():
        zt = teacher.eval()(x)
    zs = student(x)
    T = 4.0
    kd = F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="batchmean") * T * T
    assert distill.ce_weight == 0.1  # the CRD protocol's KD default
    # fp32 KL of near-equal distributions cancels: 1e-3 relative (the terms are ~1e-2)
    assert out.terms["kd"].item() == pytest.approx(0.9 * kd.item(), rel=1e-3)
    assert out.terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(zs, y).item(), rel=1e-5)
    assert torch.allclose(out.logits, zs)
    # method arguments and the CE weight reach the method
    d2 = relkd.Distillation("kd", student, teacher, example_input=(1, 28, 28), ce_weight=0.5,
                            temperature=2.0, weight=1.0)  # fmt: skip
    out2 = d2.eval()(x, y)
    kd2 = F.kl_div(F.log_softmax(zs / 2, 1), F.softmax(zt / 2, 1), reduction="batchmean") * 4
    assert out2.terms["kd"].item() == pytest.approx(kd2.item(), rel=1e-3)
    assert out2.terms["ce"].item() == pytest.approx(0.5 * F.cross_entropy(zs, y).item(), rel=1e-5)


def test_shapes_are_measured_for_the_user():
    teacher, student = _models()
    distill = relkd.Distillation(
        "fitnet", student, teacher, example_input=torch.zeros(5, 1, 28, 28)
    )
    ctx = distill.method.ctx
    assert ctx.num_classes == 10
    assert ctx.student_shapes["logits"] == (10,) and ctx.teacher_shapes["logits"] == (10,)
    tap = distill.method.student_taps()[0]
    feats = relkd.FeatureTap(student, [tap])(torch.zeros(2, 1, 28, 28)).feats[tap]
    assert ctx.student_shapes[tap] == tuple(feats.shape[1:])


def test_a_multi_stage_method_exposes_its_phases():
    teacher, student = _models()
    distill = relkd.Distillation("ab", student, teacher, example_input=(1, 28, 28), init_epochs=2)
    assert distill.phases() == [("init", 2)]
    x, y = _data(8).tensors
    distill.set_phase("init")
    assert "ce" not in distill(x, y).terms  # no CE during a pre-training phase
    distill.set_phase("main")
    assert "ce" in distill(x, y).terms


def test_to_moves_the_teacher_with_the_student():
    teacher, student = _models()
    distill = relkd.Distillation("kd", student, teacher, example_input=(1, 28, 28)).double()
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(student.parameters()).dtype == torch.float64
    x, y = _data(4).tensors
    out = distill(x.double(), y)  # would fail on a float32 teacher
    assert out.logits.dtype == torch.float64 and torch.isfinite(out.loss)


def test_wrong_use_fails_clearly():
    teacher, student = _models()
    with pytest.raises(RelkdError, match="needs a teacher"):
        relkd.Distillation("kd", student, None, example_input=(1, 28, 28))
    with pytest.raises(RelkdError, match="kdd"):
        relkd.Distillation("kdd", student, teacher, example_input=(1, 28, 28))
    with pytest.raises(RelkdError, match="temprature"):
        relkd.Distillation("kd", student, teacher, example_input=(1, 28, 28), temprature=2)
    with pytest.raises(RelkdError, match="num_classes=100"):
        relkd.Distillation("kd", student, teacher, example_input=(1, 28, 28), num_classes=100)
    other = relkd.create_model("cnn_small", 7, in_chans=1)
    with pytest.raises(RelkdError, match="7 classes"):
        relkd.Distillation("kd", student, other, example_input=(1, 28, 28))
    with pytest.raises(RelkdError, match="shape"):
        relkd.Distillation("kd", student, teacher, example_input=(3, 5, 5))
    with pytest.raises(RelkdError, match="num_train_samples"):
        relkd.Distillation("crd", student, teacher, example_input=(1, 28, 28))


class _MyNet(nn.Module):
    """A user's own module: no feature_info, no relkd base class."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def test_a_user_module_with_a_relational_method():
    teacher, _ = _models()
    student = _MyNet()
    ds = _data()
    distill = relkd.Distillation("rkd", student, teacher, example_input=(1, 28, 28))
    _, outs = _user_loop(distill, ds)
    assert all(torch.isfinite(o.loss) for o in outs)
