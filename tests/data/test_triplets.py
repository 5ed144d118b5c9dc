"""TripletDataset: anchor / same-class positive / other-class negative, for CORSD."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, Subset

from relkd.data import collate_with_extras
from relkd.data.triplets import TripletDataset
from relkd.registry import RelkdError


class Toy(Dataset):
    """Item i = (tensor([i]) image, label); counts __getitem__ calls."""

    def __init__(self, labels, with_targets=True):
        self._labels = list(labels)
        if with_targets:
            self.targets = list(labels)
        self.calls = 0

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        self.calls += 1
        return torch.tensor([float(i)]), self._labels[i]


LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 3]  # class 3 has a single sample


def _check(ds, tri):
    for _ in range(5):
        for i in range(len(ds)):
            x, y, ex = tri[i]
            p, n = int(ex["pos"]), int(ex["neg"])
            assert int(x) == i and y == LABELS[i]
            assert ex["pos_target"] == y == LABELS[p]
            assert ex["neg_target"] == LABELS[n] != y
            if LABELS.count(y) > 1:
                assert p != i
            else:
                assert p == i


def test_same_class_positive_other_class_negative():
    torch.manual_seed(0)
    ds = Toy(LABELS)
    tri = TripletDataset(ds)
    assert ds.calls == 0  # labels read from ds.targets, no image decoded
    assert len(tri) == len(ds) and list(tri.targets) == LABELS
    _check(ds, tri)


def test_without_targets_attribute_and_through_subset():
    ds = Toy(LABELS, with_targets=False)
    tri = TripletDataset(ds)
    assert ds.calls == len(ds)  # one pass over the data set for the labels
    _check(ds, tri)
    sub = TripletDataset(Subset(Toy(LABELS), [0, 1, 3, 4]))
    for i in range(4):
        _, y, ex = sub[i]
        assert ex["pos_target"] == y and ex["neg_target"] != y


def test_every_other_sample_and_class_gets_drawn():
    torch.manual_seed(0)
    tri = TripletDataset(Toy(LABELS))
    pos, neg = set(), set()
    for _ in range(300):
        p, n = tri.sample_indices(0)
        pos.add(p)
        neg.add(LABELS[n])
    assert pos == {3, 6} and neg == {1, 2, 3}


def test_reproducible_from_global_rng_and_from_seed():
    tri = TripletDataset(Toy(LABELS))
    torch.manual_seed(5)
    a = [tri.sample_indices(i) for i in range(len(LABELS))]
    torch.manual_seed(5)
    assert a == [tri.sample_indices(i) for i in range(len(LABELS))]
    s = TripletDataset(Toy(LABELS), seed=1)
    first = [s.sample_indices(i) for i in range(len(LABELS))]
    torch.manual_seed(123)  # the global RNG does not matter with a seed
    assert first == [s.sample_indices(i) for i in range(len(LABELS))]
    draws = []
    for e in range(6):
        s.set_epoch(e)
        draws.append([s.sample_indices(i) for i in range(len(LABELS))])
    assert len({tuple(d) for d in draws}) > 1


def test_one_class_fails_loudly():
    with pytest.raises(RelkdError, match="2 classes"):
        TripletDataset(Toy([1, 1, 1]))


def test_collate_and_extras_passthrough():
    class WithExtras(Toy):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, y, {"index": i}

    tri = TripletDataset(WithExtras(LABELS))
    x, y, ex = collate_with_extras([tri[i] for i in range(4)])
    assert x.shape == (4, 1) and y.tolist() == LABELS[:4]
    assert set(ex) == {"index", "pos", "neg", "pos_target", "neg_target"}
    assert ex["pos"].shape == (4, 1) and torch.equal(ex["pos_target"], y)
    assert ex["index"].tolist() == [0, 1, 2, 3]


def test_wrappers_keep_their_extras_through_a_dataloader_over_a_subset():
    """Regression: a pass-through ``__getattr__`` exposed Subset.__getitems__ to DataLoader,
    which then returned the inner (img, target) pairs without the wrapper's extras."""
    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from relkd.data import IndexedDataset, collate_with_extras
    from relkd.data.triplets import TripletDataset

    base = TensorDataset(torch.randn(12, 1, 4, 4), torch.arange(12) % 3)
    base.targets = torch.arange(12) % 3
    sub = Subset(base, list(range(10)))
    for ds, key in ((TripletDataset(sub, seed=0), "pos"), (IndexedDataset(sub), "index")):
        batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_with_extras)))
        assert len(batch) == 3 and key in batch[2]
