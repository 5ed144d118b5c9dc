"""The "rrd" method: teacher projection, ring-buffer queue, queue order, export and DDP."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from relkd.engine.distiller import Distiller
from relkd.losses.rrd import rrd_loss
from relkd.methods import MethodContext, build_method
from relkd.models.base import ModelOutput
from relkd.registry import RelkdError

K = 10


def _ctx() -> MethodContext:
    return MethodContext(
        num_classes=10,
        student_shapes={"pooled": (16,), "logits": (10,)},
        teacher_shapes={"pooled": (32,), "logits": (10,)},
    )


def _make(**args):
    method, _ = build_method("rrd", _ctx(), {"queue_size": K, **args})
    return method.train()


def _outs(f_s, f_t):
    b = f_s.shape[0]
    return (
        ModelOutput(torch.zeros(b, 10), feats={"pooled": f_s}),
        ModelOutput(torch.zeros(b, 10), feats={"pooled": f_t}),
    )


def _step(m, f_s, f_t):
    return m(*_outs(f_s, f_t), torch.zeros(f_s.shape[0], dtype=torch.long))["rrd"]


def test_defaults():
    m, ce = build_method("rrd", _ctx())
    # v5 preset (the default chosen by cifar10jpg-val-study)
    assert ce == 1.0 and m.weight == 1.0 and (m.version, m.tau_s, m.tau_t) == ("v5", 0.1, 0.02)
    assert m.queue.shape == (16384, 128) and int(m.queue_ptr) == 0
    assert torch.allclose(m.queue.norm(dim=1), torch.ones(16384))  # unit rows
    assert m.student_taps() == ["pooled"] and m.teacher_taps() == ["pooled"]
    assert m.enqueue_first and m.teacher_proj == "fixed_random"
    assert not any(p.requires_grad for p in m.proj_t.parameters())
    assert all(p.requires_grad for p in m.proj_s.parameters())


@pytest.mark.parametrize("mode", ["fixed_random", "shared"])
def test_teacher_projection_fixed_or_trained(mode):
    torch.manual_seed(0)
    m = _make(teacher_proj=mode)
    student = nn.Linear(8, 16)
    params = [*student.parameters(), *m.parameters()]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4)
    w_t, b_t, w_s = m.proj_t.weight.clone(), m.proj_t.bias.clone(), m.proj_s.weight.clone()
    for _ in range(5):
        f_t = torch.randn(4, 32)
        loss = _step(m, student(torch.randn(4, 8)), f_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(m.proj_s.weight, w_s)
    fixed = torch.equal(m.proj_t.weight, w_t) and torch.equal(m.proj_t.bias, b_t)
    assert fixed == (mode == "fixed_random")


def test_queue_wraparound_batches_not_dividing_k():
    torch.manual_seed(0)
    m = _make()
    init = m.queue.clone()
    zs = []
    for i in range(3):
        f_s, f_t = torch.randn(4, 16), torch.randn(4, 32)
        zs.append(m.embed(f_s, f_t)[1])
        _step(m, f_s, f_t)
        assert int(m.queue_ptr) == [4, 8, 2][i]
        if i == 0:
            assert torch.equal(m.queue[:4], zs[0]) and torch.equal(m.queue[4:], init[4:])
    z1, z2, z3 = zs
    expected = torch.cat([z3[2:], z1[2:], z2, z3[:2]])
    assert torch.equal(m.queue, expected)


def test_batch_larger_than_queue():
    torch.manual_seed(0)
    m = _make()
    _step(m, torch.randn(3, 16), torch.randn(3, 32))
    f_s, f_t = torch.randn(13, 16), torch.randn(13, 32)
    z = m.embed(f_s, f_t)[1]
    loss = _step(m, f_s, f_t)
    assert torch.isfinite(loss)
    assert int(m.queue_ptr) == (3 + 13) % K
    # one row at a time from position 3: rows 3..12 survive, row j at (3 + j) % K
    for j in range(3, 13):
        assert torch.equal(m.queue[(3 + j) % K], z[j])


@pytest.mark.parametrize("first", [False, True])
def test_enqueue_first_changes_target(first):
    torch.manual_seed(0)
    m = _make(enqueue_first=first)
    _step(m, torch.randn(4, 16), torch.randn(4, 32))  # queue holds teacher rows already
    f_s, f_t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 32)
    z_s, z_t = m.embed(f_s, f_t)
    before = m.queue.clone()
    loss = _step(m, f_s, f_t)
    after = m.queue.clone()
    taus = {"tau_s": m.tau_s, "tau_t": m.tau_t}
    ref_before, ref_after = rrd_loss(z_s, z_t, before, **taus), rrd_loss(z_s, z_t, after, **taus)
    assert not torch.allclose(ref_before, ref_after)
    assert torch.allclose(loss, ref_after if first else ref_before, rtol=1e-6, atol=0)
    loss.backward()  # the in-place enqueue does not break backward
    assert f_s.grad.abs().sum() > 0 and m.proj_s.weight.grad is not None


def test_eval_mode_leaves_queue_alone():
    torch.manual_seed(0)
    m = _make().eval()
    q = m.queue.clone()
    assert torch.isfinite(_step(m, torch.randn(4, 16), torch.randn(4, 32)))
    assert torch.equal(m.queue, q) and int(m.queue_ptr) == 0


def test_exported_student_has_no_queue_or_projections():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    d = Distiller(student, _make(), ce_weight=1.0).train()
    t_out = ModelOutput(torch.zeros(4, 10), feats={"pooled": torch.randn(4, 32)})
    _, terms = d(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), t_out)
    assert set(terms) == {"ce", "rrd"}
    sum(terms.values()).backward()
    keys = set(d.state_dict())
    assert {
        "method.queue",
        "method.queue_ptr",
        "method.proj_s.weight",
        "method.proj_t.weight",
    } <= keys
    assert set(d.student.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_composition_with_kd():
    m, ce = build_method("rrd+kd", _ctx(), {"rrd": {"queue_size": K}})
    assert ce == 1.0 and m.parts["kd"].weight == 1.0
    s, t = _outs(torch.randn(4, 16), torch.randn(4, 32))
    s.logits, t.logits = torch.randn(4, 10), torch.randn(4, 10)
    assert set(m(s, t, torch.zeros(4, dtype=torch.long))) == {"rrd", "kd"}


@pytest.mark.parametrize(
    "args, match",
    [
        ({"teacher_proj": "trained"}, "fixed_random, shared"),
        ({"queue_size": 0}, "queue_size"),
        ({"tau_s": 0.0}, "tau_s"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(RelkdError, match=match):
        _make(**args)


def test_missing_pooled_shape():
    ctx = _ctx()
    ctx.teacher_shapes = {"logits": (10,)}
    with pytest.raises(RelkdError, match="teacher's 'pooled'"):
        build_method("rrd", ctx)


def _ddp_worker(rank, world, port, batches, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = {}
        for first in (False, True):
            torch.manual_seed(0)  # same init on every rank, as DDP's initial broadcast ensures
            m = _make(enqueue_first=first)
            losses = []
            for f_s, f_t in batches:
                b = f_s.shape[0] // world
                rows = slice(rank * b, (rank + 1) * b)
                losses.append(_step(m, f_s[rows], f_t[rows]).item())
            result[first] = (m.queue.clone(), int(m.queue_ptr), losses)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_the_single_process_queue(tmp_path):
    torch.manual_seed(1)
    # global batches of 6 (3 per rank) into K = 10: the queue wraps on the second step
    batches = [(torch.randn(6, 16), torch.randn(6, 32)) for _ in range(3)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, batches, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for first in (False, True):
        torch.manual_seed(0)
        ref = _make(enqueue_first=first)
        ref_losses = [_step(ref, f_s, f_t).item() for f_s, f_t in batches]
        q0, p0, l0 = ranks[0][first]
        q1, p1, l1 = ranks[1][first]
        assert torch.equal(q0, q1) and p0 == p1 == int(ref.queue_ptr) == 8
        assert torch.allclose(q0, ref.queue, atol=1e-6)
        # equal local batches: the mean of the rank losses is the single-process loss
        for a, b, r in zip(l0, l1, ref_losses):
            assert (a + b) / 2 == pytest.approx(r, rel=1e-5)


def test_version_presets():
    v5, _ = build_method("rrd", _ctx(), {"queue_size": K})  # the default since the study
    v4, _ = build_method("rrd", _ctx(), {"queue_size": K, "version": "v4"})
    assert (v4.version, v4.tau_s, v4.tau_t, v4.enqueue_first) == ("v4", 0.04, 0.1, False)
    assert (v5.version, v5.tau_s, v5.tau_t, v5.enqueue_first) == ("v5", 0.1, 0.02, True)
    # explicit values override the preset
    m, _ = build_method("rrd", _ctx(), {"queue_size": K, "version": "v5", "tau_t": 0.05})
    assert (m.tau_s, m.tau_t, m.enqueue_first) == (0.1, 0.05, True)
    with pytest.raises(RelkdError, match="v4, v5") as err:
        build_method("rrd", _ctx(), {"version": "v6"})
    # the method's own error reaches the user once, not wrapped in a second "method 'rrd':"
    assert str(err.value) == "method 'rrd': version='v6'; valid: v4, v5"


def _hand_rrd(zs, zt, queue, tau_s, tau_t):
    """-(1/B) sum_i sum_k p_t,ik log p_s,ik with plain floats."""
    total = 0.0
    for a, b in zip(zs, zt):
        ss = [sum(x * y for x, y in zip(a, q)) / tau_s for q in queue]
        st = [sum(x * y for x, y in zip(b, q)) / tau_t for q in queue]
        lse_s = math.log(sum(math.exp(v) for v in ss))
        et = [math.exp(v) for v in st]
        total -= sum(e / sum(et) * (v - lse_s) for e, v in zip(et, ss))
    return total / len(zs)


@pytest.mark.parametrize("version", ["v4", "v5"])
def test_queue_order_against_hand_reference(version):
    """Queue of 3 rows, batches of 2: v4 scores the second batch against the queue holding the
    first batch's teacher rows in slots 0-1 and an initial row in slot 2; v5 against the queue
    after writing the second batch at the pointer (slots 2 and 0)."""
    torch.manual_seed(0)
    m, _ = build_method("rrd", _ctx(), {"queue_size": 3, "dim": 4, "version": version})
    m.train()
    q0 = m.queue.tolist()
    f1 = (torch.randn(2, 16), torch.randn(2, 32))
    f2 = (torch.randn(2, 16), torch.randn(2, 32))
    zs1, zt1 = (z.tolist() for z in m.embed(*f1))
    zs2, zt2 = (z.tolist() for z in m.embed(*f2))
    loss1 = _step(m, *f1)
    loss2 = _step(m, *f2)
    tau_s, tau_t = (0.04, 0.1) if version == "v4" else (0.1, 0.02)
    if version == "v4":
        want1 = _hand_rrd(zs1, zt1, q0, tau_s, tau_t)
        want2 = _hand_rrd(zs2, zt2, [zt1[0], zt1[1], q0[2]], tau_s, tau_t)
    else:
        want1 = _hand_rrd(zs1, zt1, [zt1[0], zt1[1], q0[2]], tau_s, tau_t)
        want2 = _hand_rrd(zs2, zt2, [zt2[1], zt1[1], zt2[0]], tau_s, tau_t)
    assert loss1.item() == pytest.approx(want1, rel=1e-5)
    assert loss2.item() == pytest.approx(want2, rel=1e-5)
    # after both batches the queue is the same in both orders: slots 2, 0 hold batch 2
    want_q = [zt2[1], zt1[1], zt2[0]]
    for row, want in zip(m.queue.tolist(), want_q):
        assert row == pytest.approx(want, abs=1e-6)
    assert int(m.queue_ptr) == 1
