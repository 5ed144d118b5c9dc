import math

import pytest
import torch
import torch.nn.functional as F

from relkd.losses.crd import (
    NCE_EPS,
    contrast_scores,
    crd_loss,
    estimate_z,
    momentum_update,
    nce_loss,
    sample_contrast_index,
    sample_other_class_index,
)


def _nce_reference(probs: list[list[float]], n: int) -> float:
    """Paper Eq. 18 per sample, written out: h = P / (P + K / N)."""
    total = 0.0
    for row in probs:
        k = len(row) - 1
        noise = k / n
        total += math.log(row[0] / (row[0] + noise + NCE_EPS))
        total += sum(math.log(noise / (p + noise + NCE_EPS)) for p in row[1:])
    return -total / len(probs)


def test_nce_loss_matches_per_sample_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 6, generator=g, dtype=torch.float64) * 0.01
    assert nce_loss(probs, 50).item() == pytest.approx(_nce_reference(probs.tolist(), 50), rel=1e-9)


def test_crd_loss_matches_explicit_reference():
    g = torch.Generator().manual_seed(1)
    n, d, b, k, t = 12, 4, 3, 5, 0.5
    vs = F.normalize(torch.randn(b, d, generator=g), dim=1)
    vt = F.normalize(torch.randn(b, d, generator=g), dim=1)
    mem_s = F.normalize(torch.randn(n, d, generator=g), dim=1)
    mem_t = F.normalize(torch.randn(n, d, generator=g), dim=1)
    idx = sample_contrast_index(torch.tensor([0, 5, 11]), n, k, generator=g)
    z_s, z_t = 3.0, 7.0

    def probs(anchor, memory, z):
        return [
            [math.exp(sum(memory[j, c].item() * anchor[i, c].item() for c in range(d)) / t) / z
             for j in idx[i].tolist()]
            for i in range(b)
        ]  # fmt: skip

    expected = _nce_reference(probs(vs, mem_t, z_s), n) + _nce_reference(probs(vt, mem_s, z_t), n)
    got = crd_loss(vs, vt, mem_s, mem_t, idx, z_s, z_t, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_crd_loss_gradients_and_fp32_under_autocast():
    n, d = 20, 8
    vs = F.normalize(torch.randn(4, d), dim=1).requires_grad_()
    vt = F.normalize(torch.randn(4, d), dim=1).requires_grad_()
    mem = F.normalize(torch.randn(n, d), dim=1).requires_grad_()
    idx = sample_contrast_index(torch.arange(4), n, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = contrast_scores(vs.bfloat16(), mem, idx, 0.07)
        loss = crd_loss(vs.bfloat16(), vt.bfloat16(), mem, mem, idx, 1.0, 1.0)
    assert scores.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert vs.grad.abs().sum() > 0 and vt.grad.abs().sum() > 0 and mem.grad is None


def test_estimate_z():
    s = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert estimate_z(s, 100).item() == pytest.approx(300.0)


def test_sample_contrast_index_excludes_positive_and_is_uniform():
    g = torch.Generator().manual_seed(0)
    n = 5
    index = torch.tensor([0, 2, 4])
    idx = sample_contrast_index(index, n, 20000, generator=g)
    assert idx.shape == (3, 20001) and idx.dtype == torch.long
    assert torch.equal(idx[:, 0], index)
    for row, pos in zip(idx[:, 1:], index.tolist()):
        assert (row != pos).all() and row.min() >= 0 and row.max() < n
        counts = torch.bincount(row, minlength=n).float() / row.numel()
        others = [j for j in range(n) if j != pos]
        assert torch.allclose(counts[others], torch.full((n - 1,), 0.25), atol=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        sample_contrast_index(index[:1] * 0, 1, 3)


def test_momentum_update_formula_and_purity():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(6, 3, generator=g), dim=1)
    before = memory.clone()
    emb = F.normalize(torch.randn(2, 3, generator=g), dim=1)
    index = torch.tensor([4, 1])
    idx, rows = momentum_update(memory, index, emb, momentum=0.25)
    assert torch.equal(memory, before)  # pure: nothing written
    assert idx.tolist() == [4, 1]
    for r, (i, e) in enumerate(zip(index.tolist(), emb)):
        v = [0.25 * memory[i, c].item() + 0.75 * e[c].item() for c in range(3)]
        norm = math.sqrt(sum(x * x for x in v))
        assert rows[r].tolist() == pytest.approx([x / norm for x in v], rel=1e-6)


def test_momentum_update_duplicate_index_keeps_last():
    memory = torch.eye(4)
    emb = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    idx, rows = momentum_update(memory, torch.tensor([0, 3, 0]), emb, momentum=0.5)
    assert idx.tolist() == [3, 0]
    s = 1 / math.sqrt(2)
    assert rows.tolist() == [pytest.approx([0, 0, s, s]), pytest.approx([s, 0, 0, s])]


def test_sample_other_class_index_only_other_classes_without_replacement():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2])  # N = 12
    index = torch.tensor([0, 2, 5, 9])
    idx = sample_other_class_index(index, labels, 7, generator=g)
    assert idx.shape == (4, 8) and idx.dtype == torch.long
    assert torch.equal(idx[:, 0], index)
    for row, i in zip(idx[:, 1:], index.tolist()):
        assert (labels[row] != labels[i]).all()  # no negative shares the anchor's class
        assert len(set(row.tolist())) == 7  # without replacement (K <= candidates)
    # class 2 (5 members) leaves 7 candidates: a draw of all of them is exactly those 7
    assert sorted(idx[2, 1:].tolist()) == [j for j in range(12) if labels[j] != 2]


@pytest.mark.parametrize("replacement", [False, True])
def test_sample_other_class_index_uniform_over_the_other_classes(replacement):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 0, 2, 0, 1, 0, -1, 3])  # unsorted, one label unknown (-1)
    index = torch.full((20000,), 3)  # anchor 3 of class 0, many rows
    idx = sample_other_class_index(index, labels, 2, replacement=replacement, generator=g)
    neg = idx[:, 1:]
    counts = torch.bincount(neg.flatten(), minlength=8).float() / neg.numel()
    assert counts[[1, 3, 5]].sum() == 0  # class 0, the anchor included
    others = [0, 2, 4, 6, 7]  # the unknown sample 6 counts as another class
    assert torch.allclose(counts[others], torch.full((5,), 0.2), atol=0.01)
    # pairs: without replacement never equal; with replacement equal with chance 1/5
    same = (neg[:, 0] == neg[:, 1]).float().mean().item()
    assert same == 0 if not replacement else same == pytest.approx(0.2, abs=0.015)


def test_sample_other_class_index_replacement_fallback_and_chunks():
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 1, 1, -1, 2])
    index = torch.tensor([0, 2])
    # K = 200 > the 4 candidates of class 0 and class 1: RepDistiller's rule, with replacement
    idx = sample_other_class_index(index, labels, 200, generator=g)
    assert set(idx[0, 1:].tolist()) == {2, 3, 4, 5} and set(idx[1, 1:].tolist()) == {0, 1, 4, 5}
    # chunking over rows (1 row per chunk here) draws valid rows too
    lab = torch.arange(30) % 3
    out = sample_other_class_index(torch.arange(30), lab, 5, generator=g, chunk_elems=30)
    assert all((lab[r[1:]] != lab[r[0]]).all() and len(set(r[1:].tolist())) == 5 for r in out)
    with pytest.raises(ValueError, match="another class"):
        sample_other_class_index(torch.tensor([0]), torch.zeros(3).long(), 2)
    with pytest.raises(ValueError, match="must be known"):
        sample_other_class_index(torch.tensor([4]), labels, 2)
