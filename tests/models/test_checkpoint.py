"""load_checkpoint accepts the community formats, always with weights_only=True."""

from __future__ import annotations

import pickle

import pytest
import torch

from relkd.models import create_model, load_checkpoint, save_student
from relkd.registry import RelkdError


def _fresh():
    torch.manual_seed(1)
    return create_model("resnet8", 100)


@pytest.mark.parametrize("fmt", ["repdistiller", "bare", "state_dict", "ddp_prefix", "safetensors"])
def test_formats_load_strictly(tmp_path, fmt):
    src = create_model("resnet8", 100)
    sd = src.state_dict()
    path = tmp_path / "ckpt_epoch_240.pth"
    if fmt == "repdistiller":  # RepDistiller's train_teacher.py saves this dict
        torch.save({"epoch": 240, "model": sd, "accuracy": 69.1, "optimizer": {}}, path)
    elif fmt == "bare":
        torch.save(sd, path)
    elif fmt == "state_dict":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif fmt == "ddp_prefix":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_student(src, path)
    dst = load_checkpoint(_fresh(), path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_mismatch_and_missing_are_clear(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": create_model("resnet14", 100).state_dict()}, path)
    with pytest.raises(RelkdError, match="does not match"):
        load_checkpoint(_fresh(), path)
    with pytest.raises(RelkdError, match="does not exist"):
        load_checkpoint(_fresh(), tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


# torch warns that the plain pickle (protocol 4) is not its own format: expected here.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_weights_only_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(RelkdError, match="cannot read"):
        load_checkpoint(_fresh(), path)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and not msg.rstrip().endswith(":"), msg
    assert "weights_only" not in msg, msg  # never torch's advice to load unsafely
    return msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_refusal_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(RelkdError) as e:
        load_checkpoint(_fresh(), path)
    assert "refused" in _one_line(e)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("damage", ["truncated", "junk", "empty"])
def test_damaged_files_one_clear_line(tmp_path, suffix, damage):
    good = tmp_path / f"good{suffix}"
    save_student(create_model("resnet8", 100), good)
    raw = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "junk": b"junk" * 64, "empty": b""}[damage])
    with pytest.raises(RelkdError) as e:
        load_checkpoint(_fresh(), bad)
    msg = _one_line(e)
    assert str(bad) in msg and "cannot read checkpoint" in msg
    assert msg.split(": ", 1)[1].strip(), msg  # a reason follows the colon


def test_mismatch_is_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    save_student(create_model("resnet8", 10), path)  # another class count
    with pytest.raises(RelkdError) as e:
        load_checkpoint(_fresh(), path)
    assert "size mismatch" in _one_line(e)
