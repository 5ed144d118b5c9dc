"""Per-model input normalisation: the renormalize formula, where a model's statistics come from,
and a teacher trained on other statistics giving, inside relkd's pipeline, the logits a plain loop
feeding it its own statistics gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relkd.data import InMemoryLoader
from relkd.data.teacher_cache import TeacherCache
from relkd.engine.teacher import Teacher
from relkd.models import create_model
from relkd.models.normalization import (
    attach_input_norm,
    find_input_norm,
    input_norm_fingerprint,
    renormalize,
)
from relkd.registry import RelkdError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATA = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def test_renormalize_matches_normalising_the_raw_pixels() -> None:
    torch.manual_seed(0)
    raw = torch.rand(4, 3, 5, 5)  # pixels in [0, 1]
    (dm, ds), (mm, ms) = DATA, IMAGENET
    x_data = (raw - torch.tensor(dm)[:, None, None]) / torch.tensor(ds)[:, None, None]
    x_model = (raw - torch.tensor(mm)[:, None, None]) / torch.tensor(ms)[:, None, None]
    out = renormalize(x_data, dm, ds, mm, ms)
    torch.testing.assert_close(out, x_model, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(x_data, x_model, atol=1e-2)  # the statistics really differ


def test_renormalize_equal_statistics_is_the_identity_object() -> None:
    x = torch.randn(2, 3, 4, 4)
    assert renormalize(x, *DATA, *DATA) is x


def test_renormalize_rejects_wrong_channel_counts() -> None:
    with pytest.raises(RelkdError, match="2 values for an input of 3 channels"):
        renormalize(torch.randn(2, 3, 4, 4), (0.1, 0.2), (1.0, 1.0), (0.0, 0.0), (1.0, 1.0))


class Declares(nn.Module):
    def __init__(self, mean=None, std=None) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.input_mean, self.input_std = mean, std

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_find_input_norm_order() -> None:
    assert find_input_norm(create_model("resnet8", num_classes=10)) is None
    assert find_input_norm(Declares(*IMAGENET)) == IMAGENET
    assert find_input_norm(Declares()) is None  # declared None: the data set's statistics
    m = create_model("resnet8", num_classes=10)
    m.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # a timm module
    assert find_input_norm(m) == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(RelkdError, match="only one of input_mean"):
        find_input_norm(Declares(mean=(0.1, 0.2, 0.3)))


def test_default_attaches_nothing() -> None:
    model = create_model("resnet8", num_classes=10)
    assert attach_input_norm(model, *DATA) == ""
    assert not model._forward_pre_hooks
    assert attach_input_norm(model, *DATA, mean=DATA[0], std=DATA[1]) == ""
    assert not model._forward_pre_hooks and input_norm_fingerprint(model) == ""


def test_fingerprint_names_both_statistics_and_replacing_keeps_one_hook() -> None:
    model = create_model("resnet8", num_classes=10)
    fp = attach_input_norm(model, *DATA, mean=IMAGENET[0], std=IMAGENET[1])
    assert "0.485" in fp and "0.5071" in fp and input_norm_fingerprint(model) == fp
    fp2 = attach_input_norm(model, *DATA, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert fp2 != fp and len(model._forward_pre_hooks) == 1
    assert attach_input_norm(model, *DATA) == "" and not model._forward_pre_hooks


def test_grey_data_and_three_value_statistics() -> None:
    model = Declares(*IMAGENET)
    fp = attach_input_norm(model, (0.3,), (0.2,))
    assert f"{sum(IMAGENET[0]) / 3}" in fp  # grey: the average of the three values
    with pytest.raises(RelkdError, match="2 values but the data has 1 channels"):
        attach_input_norm(Declares((0.1, 0.2), (1.0, 1.0)), (0.3,), (0.2,))
    with pytest.raises(RelkdError, match="std must be > 0"):
        attach_input_norm(Declares((0.1,) * 3, (0.0,) * 3), *DATA)


def _train_on(model: nn.Module, raw_u8: torch.Tensor, y: torch.Tensor, mean, std) -> None:
    """A few SGD steps on inputs normalised with (mean, std): the teacher's own statistics."""
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model((raw_u8.float() / 255 - m) / s), y).backward()
        opt.step()


def test_teacher_on_other_statistics_matches_a_plain_loop(tmp_path) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (24,))
    teacher = create_model("resnet8", num_classes=10)
    _train_on(teacher, images, labels, *IMAGENET)
    teacher.eval()

    # The plain loop: the teacher fed its own statistics.
    m, s = torch.tensor(IMAGENET[0])[:, None, None], torch.tensor(IMAGENET[1])[:, None, None]
    with torch.no_grad():
        want = teacher((images.float() / 255 - m) / s)

    # relkd: a data set normalised with other statistics, the teacher told its own.
    loader = InMemoryLoader(
        images, labels, batch_size=8, shuffle=False, augment=False, padding=0, flip=False,
        mean=DATA[0], std=DATA[1],
    )  # fmt: skip
    tea = Teacher(teacher, ["pooled"])
    plain = torch.cat([tea(x).logits for x, _ in loader])
    assert not torch.allclose(plain, want, atol=1e-3), "statistics too close to tell apart"
    fp = attach_input_norm(teacher, *DATA, mean=IMAGENET[0], std=IMAGENET[1])
    assert fp
    outs = [tea(x) for x, _ in loader]
    got = torch.cat([o.logits for o in outs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert outs[0].feats["pooled"].shape == (8, 64)  # FeatureTap's names still work

    # The teacher cache runs the teacher's forward: the hook is in it as well.
    cache = TeacherCache.build(
        teacher, images, padding=0, flip=False, mean=DATA[0], std=DATA[1], dtype="fp32",
        path=tmp_path / "cache", progress=False, log=None,
    )  # fmt: skip
    zeros = torch.zeros(24, 2, dtype=torch.int64)
    cached = cache.lookup(torch.arange(24), zeros, torch.zeros(24, dtype=torch.bool)).logits
    torch.testing.assert_close(cached, want, rtol=1e-4, atol=1e-4)
