"""Method-level weights checked BY VALUE against numpy hand computations (not against the
library's own loss functions): a wrong weight, a swapped term, a missing T^2 or a wrong warm-up
step makes these fail. Covers DKD (warm-up), DIST, CLKD, CMKD, AB (AB_SCALE, stage weights) and
CORSD (term weights, stage order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import relkd.losses.corsd as corsd_losses
from relkd.methods import MethodContext, build_method
from relkd.methods.ab import AB_SCALE
from relkd.models import create_model, get_feature_info
from relkd.models.base import ModelOutput

B, C = 6, 5


def _logits(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 3, torch.randn(B, C, generator=g) * 3


def _ctx() -> MethodContext:
    return MethodContext(num_classes=C, student_shapes={"logits": (C,)})


def _out(z):
    return ModelOutput(z, feats={})


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i KL(p_i || q_i) / B."""
    return float((p * (np.log(p) - np.log(q))).sum() / p.shape[0])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


# ---------------------------------------------------------------------------------------- DKD


def _dkd_ref(zs, zt, y, t):
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    tckd = nckd = 0.0
    for i in range(zs.shape[0]):
        g = y[i]
        bs = np.array([ps[i, g], 1 - ps[i, g]])
        bt = np.array([pt[i, g], 1 - pt[i, g]])
        tckd += (bt * np.log(bt / bs)).sum()
        others = [c for c in range(zs.shape[1]) if c != g]
        qs, qt = ps[i, others] / ps[i, others].sum(), pt[i, others] / pt[i, others].sum()
        nckd += (qt * np.log(qt / qs)).sum()
    return tckd / zs.shape[0], nckd / zs.shape[0]


@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (4, 5 / 20), (18, 19 / 20), (19, 1.0)])
def test_dkd_weights_and_warmup_by_value(epoch, factor):
    zs, zt = _logits()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    m, ce = build_method("dkd", _ctx())
    assert ce == 1.0
    m.set_epoch(epoch)
    terms = m(_out(zs), _out(zt), y)
    tckd, nckd = _dkd_ref(zs.double().numpy(), zt.double().numpy(), y.numpy(), 4.0)
    assert terms["tckd"].item() == pytest.approx(factor * 16 * 1.0 * tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(factor * 16 * 8.0 * nckd, rel=1e-5)
    m.set_epoch(100)  # after the warm-up: factor 1
    assert m(_out(zs), _out(zt), y)["nckd"].item() == pytest.approx(16 * 8.0 * nckd, rel=1e-5)


# --------------------------------------------------------------------------------------- DIST


def _dist_ref(zs, zt, t):
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    inter = 1 - np.mean([_pearson(ps[i], pt[i]) for i in range(ps.shape[0])])
    intra = 1 - np.mean([_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return inter, intra


def test_dist_weights_by_value():
    zs, zt = _logits(1)
    for args, (beta, gamma, t) in (({}, (1.0, 1.0, 1.0)), (
        {"beta": 2.0, "gamma": 3.0, "temperature": 4.0}, (2.0, 3.0, 4.0)
    )):  # fmt: skip
        m, ce = build_method("dist", _ctx(), args)
        assert ce == 1.0
        terms = m(_out(zs), _out(zt), torch.zeros(B, dtype=torch.long))
        inter, intra = _dist_ref(zs.double().numpy(), zt.double().numpy(), t)
        assert terms["dist_inter"].item() == pytest.approx(t**2 * beta * inter, rel=1e-5)
        assert terms["dist_intra"].item() == pytest.approx(t**2 * gamma * intra, rel=1e-5)


# --------------------------------------------------------------------------------------- CLKD


def test_clkd_weights_by_value():
    zs, zt = _logits(2)
    a, b = zs.double().numpy(), zt.double().numpy()

    def rows(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ins = ((rows(a) - rows(b)) ** 2).mean()
    cla = ((rows(a.T) - rows(b.T)) ** 2).mean()
    cc = ((np.corrcoef(a, rowvar=False) - np.corrcoef(b, rowvar=False)) ** 2).sum() / C**2
    m, ce = build_method("clkd", _ctx())
    assert (
        ce == 1.0
    )  # lambda: 1 since cifar10jpg-val-study (the consensus 0.1 is pinned in configs)
    terms = m(_out(zs), _out(zt), torch.zeros(B, dtype=torch.long))
    assert terms["clkd_ins"].item() == pytest.approx(0.5 * ins, rel=1e-5)  # mu
    assert terms["clkd_cla"].item() == pytest.approx(0.5 * 2.0 * cla, rel=1e-5)  # mu * beta
    assert terms["clkd_cc"].item() == pytest.approx(0.4 * cc, rel=1e-4)  # nu


# --------------------------------------------------------------------------------------- CMKD


def _cmkd_ref(zs, zt, t, eps, difficulty):
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    mix = 0.0
    for i in range(zs.shape[0]):
        lp = 1 - _pearson(ps[i], pt[i])
        x = zs[i] - zs[i].mean()
        x = x / math.sqrt((x**2).mean() + 1e-12)
        soft = [
            0.5 + sum(1 / (1 + math.exp(-(x[k] - x[j]) / eps)) for j in range(len(x)))
            for k in range(len(x))
        ]
        hard = np.empty(len(x))
        hard[np.argsort(zt[i], kind="stable")] = np.arange(1, len(x) + 1)
        ls = 1 - _pearson(np.array(soft), hard)
        d = -(pt[i] * np.log(pt[i])).sum() / math.log(zs.shape[1])
        w = {"teacher_entropy": d, "teacher_entropy_inverse": 1 - d, "none": 0.5}[difficulty]
        mix += (1 - w) * lp + w * ls
    intra = 1 - np.mean([_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return mix / zs.shape[0], intra


@pytest.mark.parametrize("difficulty", ["teacher_entropy", "teacher_entropy_inverse", "none"])
def test_cmkd_weights_by_value(difficulty):
    zs, zt = _logits(3)
    args = {"weight": 2.0, "intra_weight": 0.5, "difficulty": difficulty}
    m, ce = build_method("cmkd", _ctx(), args)
    assert ce == 1.0
    terms = m(_out(zs), _out(zt), torch.zeros(B, dtype=torch.long))
    mix, intra = _cmkd_ref(zs.double().numpy(), zt.double().numpy(), 4.0, 0.1, difficulty)
    assert terms["cmkd_corr"].item() == pytest.approx(2.0 * 16 * mix, rel=1e-4)
    assert terms["cmkd_intra"].item() == pytest.approx(2.0 * 16 * 0.5 * intra, rel=1e-4)


# ----------------------------------------------------------------------------------------- AB


def test_ab_scale_and_stage_weights_by_value():
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 10, in_chans=1)
    infos = get_feature_info(model)
    names = [i.name for i in infos]
    shapes = {n: (i.channels, 4, 4) for n, i in zip(names, infos)}
    ctx = MethodContext(
        num_classes=10, student_stages=infos, teacher_stages=infos, student_shapes=shapes,
        teacher_shapes=shapes,
    )  # fmt: skip
    m, _ = build_method("ab", ctx, {"init_weight": 2.0})
    assert AB_SCALE == 3e-3
    m.set_phase("init")
    n = len(names)
    assert n >= 2
    g = torch.Generator().manual_seed(0)
    fs = {k: torch.randn(3, *shapes[k], generator=g) for k in names}
    ft = {k: torch.randn(3, *shapes[k], generator=g) for k in names}
    out = m(ModelOutput(torch.zeros(3, 10), feats=fs), ModelOutput(torch.zeros(3, 10), feats=ft),
            torch.zeros(3, dtype=torch.long))  # fmt: skip
    want = 0.0
    for i, ((s, t), conn) in enumerate(zip(m.pairs, m.connectors)):
        src = conn(fs[s]).detach().double().numpy()
        on = ft[t].double().numpy() > 0
        per = (src + 1) ** 2 * ((src > -1) & ~on) + (src - 1) ** 2 * ((src <= 1) & on)
        want += 2.0 ** (i - n + 1) * per.sum() / 3  # deepest pair weight 1, halving upwards
    assert out["ab_init"].item() == pytest.approx(2.0 * 3e-3 * want, rel=1e-5)
    m.set_phase("main")  # CRD protocol: weight 0 -> no AB term in the main phase
    assert m(ModelOutput(torch.zeros(3, 10), feats=fs), ModelOutput(torch.zeros(3, 10), feats=ft),
             torch.zeros(3, dtype=torch.long)) == {}  # fmt: skip


# -------------------------------------------------------------------------------------- CORSD


def test_corsd_term_weights_and_stage_order_by_value(monkeypatch):
    """Relation scores / aux logits of each stage replaced by fixed tensors; every term against
    its numpy formula with the official weights; stages ordered deepest first."""
    torch.manual_seed(0)
    model = create_model("ResNet18", 10)
    infos = get_feature_info(model)
    ctx = MethodContext(
        num_classes=10, student_stages=infos,
        student_shapes={i.name: (i.channels, 2, 2) for i in infos},
    )  # fmt: skip
    m, ce = build_method("corsd", ctx, {"stages": ["layer2", "layer4", "layer3"]})
    assert ce == 1.0 and m.stages == ["layer4", "layer3", "layer2"]  # k = 0 the deepest
    b, k_n = 4, 3
    g = torch.Generator().manual_seed(1)
    fake = {
        id(rn): (
            torch.rand(b, 1, generator=g), torch.randn(b, 10, generator=g) * 2,
            torch.rand(b, 1, generator=g), torch.randn(b, 10, generator=g) * 2,
        )
        for rn in m.rns
    }  # fmt: skip
    monkeypatch.setattr(m, "_pairs", lambda rn, f, bb: fake[id(rn)])
    monkeypatch.setattr(corsd_losses, "class_centre_relation", lambda *a, **k: torch.tensor(0.7))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 5, 6, 7, 8])  # anchors, positives, negatives
    feats = {s: torch.zeros(3 * b, 1) for s in m.stages}
    terms = m(ModelOutput(torch.randn(3 * b, 10), feats=feats), None, y, triplets=b)
    p, ap, n, an = ([fake[id(rn)][j].double().numpy() for rn in m.rns] for j in range(4))
    y_a, y_n, t = y[:b].numpy(), y[2 * b :].numpy(), 3.0

    def kl(lo, target):
        return t**2 * _kl_rows(_softmax(target / t), _softmax(lo / t))

    def ce_(lo, yy):
        return float(-np.log(_softmax(lo)[np.arange(b), yy]).mean())

    two = np.zeros((b, 10))
    two[np.arange(b), y_a] += 0.5
    two[np.arange(b), y_n] += 0.5
    q = _softmax(two / t)  # the official quirk: the two-hot target goes through softmax(q / T)
    want = {
        "corsd_kl": 0.16 * sum(kl(ap[k], ap[0]) for k in (1, 2)),
        "corsd_task": (0.2 - 0.16) * sum(ce_(ap[k], y_a) for k in range(k_n)),
        "corsd_kl_s": 0.04 * sum(kl(an[k], an[0]) for k in (1, 2)),
        "corsd_task_s": (0.05 - 0.04)
        * sum(float(-(q * np.log(_softmax(an[k] / t))).sum(1).mean()) for k in range(k_n)),
        "corsd_hinge": 0.01 * sum(float(np.maximum(p[k] - n[k] + 1, 0).mean()) for k in range(3)),
        "corsd_feat": 0.01
        * sum(float(((p[k] - p[0]) ** 2).mean() + ((n[k] - n[0]) ** 2).mean()) for k in (1, 2)),
        "corsd_lg": 0.01 * 0.7,
    }
    assert set(terms) == set(want)
    for key, value in want.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key
