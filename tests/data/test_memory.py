"""InMemoryLoader: exactness against torchvision, augmentation distribution, sharding, order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, Subset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from relkd.data import ArrayImageDataset, IndexedDataset, InMemoryLoader, to_tensors
from relkd.data.transforms import CIFAR100_MEAN, CIFAR100_STD, crop_flip_transforms
from relkd.registry import RelkdError


def _images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _loader(images: torch.Tensor, targets: torch.Tensor | None = None, **kw) -> InMemoryLoader:
    c = images.shape[1]
    args = dict(
        batch_size=4, shuffle=False, augment=False, padding=0, flip=False,
        mean=(0.5,) * c, std=(0.25,) * c,
    )  # fmt: skip
    args.update(kw)
    if targets is None:
        targets = torch.arange(len(images)) % 10
    return InMemoryLoader(images, targets, **args)


def _pil(img_chw: torch.Tensor) -> Image.Image:
    arr = img_chw.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


@pytest.mark.parametrize("channels", [1, 3])
def test_no_augmentation_is_bit_identical_to_torchvision(channels: int) -> None:
    images = _images(10, c=channels, h=32, w=32)
    mean, std = CIFAR100_MEAN[:channels], CIFAR100_STD[:channels]
    loader = _loader(images, batch_size=4, mean=mean, std=std)
    assert len(loader) == 3
    pipeline = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, channels, 32, 32)] * 2 + [(2, channels, 32, 32)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.stack([pipeline(_pil(img)) for img in images])
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.arange(10) % 10)


def test_from_dataset_matches_dataset_getitem() -> None:
    data = _images(6, h=32, w=32).permute(0, 2, 3, 1).numpy()
    _, test_tf = crop_flip_transforms(32, 4, CIFAR100_MEAN, CIFAR100_STD)
    ds = ArrayImageDataset(
        data, np.arange(6), transform=test_tf, mean=CIFAR100_MEAN, std=CIFAR100_STD
    )
    loader = InMemoryLoader.from_dataset(ds, batch_size=6, shuffle=False)
    assert not loader.augment
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(6)]))
    assert y.tolist() == list(range(6))
    # Subset and IndexedDataset wrappers keep item order
    sub = Subset(ds, [4, 1])
    xs, ys = next(
        iter(InMemoryLoader.from_dataset(IndexedDataset(sub), batch_size=2, shuffle=False))
    )
    assert ys.tolist() == [4, 1] and torch.equal(xs, x[[4, 1]])
    assert torch.equal(to_tensors(sub)[0], to_tensors(ds)[0][[4, 1]])


def test_from_dataset_takes_augmentation_from_dataset() -> None:
    data = _images(4, h=32, w=32).permute(0, 2, 3, 1).numpy()
    ds = ArrayImageDataset(
        data, np.arange(4), transform=lambda im: im, mean=CIFAR100_MEAN, std=CIFAR100_STD,
        augment=True, padding=4, flip=True,
    )  # fmt: skip
    loader = InMemoryLoader.from_dataset(ds, batch_size=2, shuffle=True)
    assert (loader.augment, loader.padding, loader.flip) == (True, 4, True)
    assert not InMemoryLoader.from_dataset(ds, batch_size=2, shuffle=True, augment=False).augment


def _candidates(img: torch.Tensor, p: int) -> torch.Tensor:
    """All (2p+1)^2 * 2 outputs of torchvision's RandomCrop(padding=p) + HFlip, [K, C, H, W].

    Order: index = (oy * (2p+1) + ox) * 2 + flipped.
    """
    _, h, w = img.shape
    padded = TF.pad(img, [p, p, p, p], fill=0)
    out = []
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            crop = TF.crop(padded, oy, ox, h, w)
            out += [crop, TF.hflip(crop)]
    return torch.stack(out)


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_flip_distribution_is_uniform(channels: int) -> None:
    p, h, w, n = 2, 4, 4, 5000
    base = torch.arange(1, h * w + 1, dtype=torch.uint8).view(1, h, w)  # unique, non-zero pixels
    img = torch.cat([base + 20 * k for k in range(channels)])  # [C, H, W]
    cands = _candidates(img, p)
    k = len(cands)
    assert k == 50 and len(torch.unique(cands.view(k, -1), dim=0)) == k  # all distinguishable
    loader = _loader(
        img.expand(n, -1, -1, -1).contiguous(), batch_size=1000, shuffle=True, augment=True,
        padding=p, flip=True, mean=(0.0,) * channels, std=(1.0,) * channels,
    )  # fmt: skip
    loader.set_epoch(3)
    out = torch.cat([xb for xb, _ in loader])
    raw = (out * 255).round().to(torch.uint8)  # undo the [0, 1] scaling exactly
    # every output is one of torchvision's outputs; find which
    match = (raw.view(n, 1, -1) == cands.view(1, k, -1)).all(-1)  # [n, K]
    assert bool((match.sum(1) == 1).all()), "an output is not a valid torchvision crop/flip"
    counts = match.sum(0).double()
    expected = n / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 85.4, f"chi-square {chi2:.1f} over 49 dof (p < 0.001): not uniform: {counts}"
    flip_share = counts.view(-1, 2).sum(0) / n
    assert abs(float(flip_share[1]) - 0.5) < 0.03


def test_crop_flip_outputs_differ_per_sample_and_epoch() -> None:
    images = _images(64, h=8, w=8)
    loader = _loader(images, batch_size=64, augment=True, padding=2, flip=True)
    a = next(iter(loader))[0]
    b = next(iter(loader))[0]
    assert torch.equal(a, b)  # same epoch -> same augmentation
    loader.set_epoch(1)
    assert not torch.equal(a, next(iter(loader))[0])


@pytest.mark.parametrize(("n", "world"), [(12, 3), (10, 3), (7, 4), (5, 1)])
def test_sharding_blocks_of_the_global_batch(n: int, world: int) -> None:
    images = _images(n)
    seen: list[int] = []
    lengths = set()
    for rank in range(world):
        loader = _loader(
            images, batch_size=3, shuffle=True, seed=7, rank=rank, world_size=world,
            return_index=True,
        )  # fmt: skip
        loader.set_epoch(2)
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(2)
        idx = torch.cat([ex["index"] for _, _, ex in loader]).tolist()
        # the same number of samples per rank as DistributedSampler, the same epoch permutation
        assert len(idx) == len(list(sampler))
        lengths.add(len(idx))
        seen += idx
    assert len(lengths) == 1  # equal shard lengths (DDP needs the same number of steps)
    assert set(seen) == set(range(n))  # covering
    if n % world == 0:
        assert len(seen) == n  # disjoint
    else:
        assert len(seen) == world * -(-n // world)


@pytest.mark.parametrize(("n", "world", "bs"), [(12, 3, 2), (10, 3, 3), (7, 2, 2)])
def test_ranks_together_equal_one_process_at_the_global_batch(n, world, bs) -> None:
    """Batch k of every rank, concatenated in rank order == batch k of one process at bs * W,
    images (augmentation included) and indices alike."""
    images = _images(n, h=8, w=8)
    kw = {"shuffle": True, "seed": 3, "augment": True, "padding": 2, "flip": True}
    single = _loader(images, batch_size=bs * world, return_index=True, **kw)
    ranks = [
        _loader(images, batch_size=bs, rank=r, world_size=world, return_index=True, **kw)
        for r in range(world)
    ]
    for ld in [single, *ranks]:
        ld.set_epoch(1)
    # one process pads nothing; compare over the batches where the padded tail is not involved
    for k, (xs, _, es) in enumerate(single):
        parts = [list(ld)[k] for ld in ranks]
        idx = torch.cat([p[2]["index"] for p in parts])
        if len(idx) != len(es["index"]):
            break  # the last, padded global batch
        assert torch.equal(idx, es["index"])
        assert torch.equal(torch.cat([p[0] for p in parts]), xs)


def test_uneven_shards_partition_exactly() -> None:
    n, world = 10, 3
    seen = []
    for rank in range(world):
        loader = _loader(_images(n), shuffle=True, rank=rank, world_size=world, even_shards=False)
        loader.set_epoch(0)
        seen += loader.shard_indices().tolist()
    assert sorted(seen) == list(range(n))


def test_order_is_a_function_of_seed_and_epoch() -> None:
    images = _images(50)

    def order(seed: int, epoch: int) -> list[int]:
        loader = _loader(images, batch_size=8, shuffle=True, seed=seed, return_index=True)
        loader.set_epoch(epoch)
        return torch.cat([ex["index"] for _, _, ex in loader]).tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    assert sorted(order(3, 5)) == list(range(50))
    assert order(0, 0) != list(range(50))


def test_targets_and_index_line_up() -> None:
    images = _images(20)
    targets = torch.arange(20) * 3
    loader = _loader(images, targets, batch_size=6, shuffle=True, return_index=True)
    for x, y, extras in loader:
        assert torch.equal(y, targets[extras["index"]])
        torch.testing.assert_close(x, (images[extras["index"]].float() / 255 - 0.5) / 0.25)


def test_len_and_drop_last() -> None:
    images = _images(10)
    assert len(_loader(images, batch_size=4)) == 3
    loader = _loader(images, batch_size=4, drop_last=True)
    assert len(loader) == 2 and [len(b[1]) for b in loader] == [4, 4]
    assert len(_loader(images, batch_size=4, rank=1, world_size=3)) == 1  # 4 samples per rank


def test_bad_arguments() -> None:
    with pytest.raises(RelkdError, match="uint8"):
        _loader(_images(4).float())
    with pytest.raises(RelkdError, match="one per channel"):
        _loader(_images(4), mean=(0.5,), std=(0.2,))
    with pytest.raises(RelkdError, match="rank"):
        _loader(_images(4), rank=2, world_size=2)
    with pytest.raises(RelkdError, match="as_tensors"):
        to_tensors(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.zeros(3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    images = _images(300, h=32, w=32)
    kw = dict(batch_size=64, shuffle=True, augment=True, padding=4, flip=True, return_index=True)
    cpu = _loader(images, **kw)
    gpu = _loader(images, device="cuda", **kw)
    for (xc, yc, ec), (xg, yg, eg) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda and eg["index"].is_cuda
        assert torch.equal(ec["index"], eg["index"].cpu()) and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-6)
