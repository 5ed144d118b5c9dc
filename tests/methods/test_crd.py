"""The "crd" method: loss and memory against an explicit reference, index extras, Z, export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import relkd.methods.crd as crd_mod
from relkd.engine.distiller import Distiller
from relkd.losses.crd import NCE_EPS, sample_contrast_index, sample_other_class_index
from relkd.methods import MethodContext, build_method
from relkd.models.base import ModelOutput
from relkd.registry import RelkdError

N = 20


def _ctx(n: int = N) -> MethodContext:
    return MethodContext(
        num_classes=10,
        student_shapes={"pooled": (16,), "logits": (10,)},
        teacher_shapes={"pooled": (32,), "logits": (10,)},
        num_train_samples=n,
    )


def _make(**args):
    method, _ = build_method("crd", _ctx(), {"nce_k": 5, "dim": 8, **args})
    return method.train()


LABELS = torch.arange(N) % 4  # the class of each of the N training samples


def _step(m, f_s, f_t, index):
    b = f_s.shape[0]
    s = ModelOutput(torch.zeros(b, 10), feats={"pooled": f_s})
    t = ModelOutput(torch.zeros(b, 10), feats={"pooled": f_t})
    return m(s, t, LABELS[index], index=index)["crd"]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _normalise(v):
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


def test_defaults():
    m, ce = build_method("crd", _ctx())
    assert ce == 1.0 and m.weight == 0.8 and m.nce_k == 16384
    assert (m.nce_t, m.momentum) == (0.07, 0.5)
    assert m.memory_s.shape == m.memory_t.shape == (N, 128)
    assert m.batch_extras == ("index",) and m.student_taps() == m.teacher_taps() == ["pooled"]
    assert (m.z < 0).all()
    assert (m.negatives, m.neg_replacement) == ("other_class", False)
    assert torch.equal(m.labels, torch.full((N,), -1))
    assert all(p.requires_grad for p in [*m.embed_s.parameters(), *m.embed_t.parameters()])


@pytest.mark.parametrize("negatives", ["other_class", "any"])
def test_loss_and_memory_match_explicit_reference(negatives):
    torch.manual_seed(0)
    m = _make(negatives=negatives)
    mem_s0, mem_t0 = m.memory_s.tolist(), m.memory_t.tolist()
    f_s, f_t = torch.randn(3, 16), torch.randn(3, 32)
    index = torch.tensor([3, 7, 11])
    v_s, v_t = (v.tolist() for v in m.embed(f_s, f_t))
    torch.manual_seed(5)
    loss = _step(m, f_s, f_t, index)
    torch.manual_seed(5)
    if negatives == "any":  # relkd's draw before the option existed: the same RNG stream
        idx = sample_contrast_index(index, N, 5).tolist()
    else:  # only the batch's labels are known at the first step
        known = torch.full((N,), -1)
        known[index] = LABELS[index]
        idx = sample_other_class_index(index, known, 5).tolist()
        assert torch.equal(m.labels, known)

    t, k = 0.07, 5
    e_s = [[math.exp(_dot(mem_t0[j], v_s[i]) / t) for j in idx[i]] for i in range(3)]
    e_t = [[math.exp(_dot(mem_s0[j], v_t[i]) / t) for j in idx[i]] for i in range(3)]
    z_s = N * sum(map(sum, e_s)) / (3 * (k + 1))  # Z from the first batch
    z_t = N * sum(map(sum, e_t)) / (3 * (k + 1))
    noise = k / N

    def nce(e, z):
        total = 0.0
        for row in e:
            p = [x / z for x in row]
            total += math.log(p[0] / (p[0] + noise + NCE_EPS))
            total += sum(math.log(noise / (q + noise + NCE_EPS)) for q in p[1:])
        return -total / len(e)

    expected = 0.8 * (nce(e_s, z_s) + nce(e_t, z_t))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    for mem0, v, mem in ((mem_s0, v_s, m.memory_s), (mem_t0, v_t, m.memory_t)):
        for row in range(N):
            if row in index.tolist():
                i = index.tolist().index(row)
                want = _normalise([0.5 * a + 0.5 * b for a, b in zip(mem0[row], v[i])])
            else:
                want = mem0[row]
            assert mem[row].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)

    # Z is estimated once: a second batch keeps it
    z = m.z.clone()
    _step(m, torch.randn(2, 16), torch.randn(2, 32), torch.tensor([0, 1]))
    assert torch.equal(m.z, z)


def test_index_extra_selects_updated_rows():
    rows = []
    for index in ([0, 1], [5, 6]):
        torch.manual_seed(0)
        m = _make()
        before = (m.memory_s.clone(), m.memory_t.clone())
        _step(m, torch.randn(2, 16), torch.randn(2, 32), torch.tensor(index))
        for old, new in zip(before, (m.memory_s, m.memory_t)):
            changed = (old != new).any(dim=1).nonzero().flatten().tolist()
            assert changed == index
        rows.append(m.memory_s.clone())
    assert not torch.equal(rows[0], rows[1])


def test_gradients_and_eval_mode():
    torch.manual_seed(0)
    m = _make()
    f_s, f_t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    loss = _step(m, f_s, f_t, torch.arange(4))
    loss.backward()  # the in-place memory update does not break backward
    assert f_s.grad.abs().sum() > 0 and f_t.grad is None
    assert m.embed_s.weight.grad.abs().sum() > 0 and m.embed_t.weight.grad.abs().sum() > 0
    m.eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert torch.isfinite(_step(m, torch.randn(4, 16), torch.randn(4, 32), torch.arange(4)))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


def test_errors():
    with pytest.raises(RelkdError, match="num_train_samples"):
        build_method("crd", _ctx(n=0))
    with pytest.raises(RelkdError, match="nce_t"):
        build_method("crd", _ctx(), {"nce_t": 0.0})
    with pytest.raises(RelkdError, match="'other_class', 'any'"):
        build_method("crd", _ctx(), {"negatives": "exact"})
    with pytest.raises(RelkdError, match="neg_replacement"):
        build_method("crd", _ctx(), {"neg_replacement": "yes"})
    m = _make()
    s = ModelOutput(torch.zeros(2, 10), feats={"pooled": torch.randn(2, 16)})
    t = ModelOutput(torch.zeros(2, 10), feats={"pooled": torch.randn(2, 32)})
    with pytest.raises(RelkdError, match="'index'"):
        m(s, t, torch.zeros(2, dtype=torch.long))


def test_export_and_composition():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    method, ce = build_method("crd+kd", _ctx(), {"crd": {"nce_k": 5, "dim": 8}})
    assert ce == 1.0 and method.batch_extras == ("index",)
    d = Distiller(student, method, ce_weight=ce).train()
    t_out = ModelOutput(torch.randn(4, 10), feats={"pooled": torch.randn(4, 32)})
    _, terms = d(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), t_out, index=torch.arange(4))
    assert set(terms) == {"ce", "crd", "kd"}
    sum(terms.values()).backward()
    assert {"method.parts.crd.memory_s", "method.parts.crd.embed_t.weight"} <= set(d.state_dict())
    assert set(d.student.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_other_class_negatives_never_share_the_anchor_class(monkeypatch):
    """Two epochs over the N samples: a negative never has the anchor's class where that class
    is known (the rows written so far), and from the second epoch on never at all."""
    draws = []
    real = crd_mod.sample_other_class_index

    def spy(*a, **k):
        out = real(*a, **k)
        draws.append(out)
        return out

    monkeypatch.setattr(crd_mod, "sample_other_class_index", spy)
    torch.manual_seed(0)
    m = _make()
    seen: set[int] = set()
    for epoch in range(2):
        for index in torch.randperm(N).split(6):
            written = seen | set(index.tolist())
            _step(m, torch.randn(len(index), 16), torch.randn(len(index), 32), index)
            idx = draws[-1]
            assert torch.equal(idx[:, 0], index)
            for row in idx:
                neg = row[1:]
                assert (neg != row[0]).all()
                same = LABELS[neg] == LABELS[row[0]]
                if epoch == 1:
                    assert not same.any()
                else:  # same-class draws only among rows never written (random init)
                    assert not any(int(j) in written for j in neg[same])
                assert len(set(neg.tolist())) == len(neg)  # without replacement
            seen = written
    assert torch.equal(m.labels, LABELS)
    # eval mode records nothing
    m.eval()
    before = m.labels.clone()
    _step(m, torch.randn(2, 16), torch.randn(2, 32), torch.tensor([0, 1]))
    assert torch.equal(m.labels, before)


def test_any_negatives_keep_the_old_state_and_draws():
    m = _make(negatives="any")
    assert "labels" not in m.state_dict()
    assert set(m.state_dict()) == {
        "memory_s", "memory_t", "z", "embed_s.weight", "embed_s.bias", "embed_t.weight",
        "embed_t.bias",
    }  # fmt: skip
