"""Median wall time of one training step (and one teacher forward) per memory format, on the CPU.

    PYTHONPATH=src .venv/bin/python benchmarks/step_times.py

One torch thread, batch 128 of 3x32x32 random images, SGD with momentum, median of 6 steps
(the first included: no warm-up). This produced the resnet8 / resnet20 NCHW vs channels_last
step times quoted in the headers of benchmarks/suites/cifar10jpg-long.yaml and
cifar10jpg-val-study.yaml (2026-12-01 ~14:36 UTC, 2-core Zen 2 VM, otherwise idle).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from relkd.models import create_model


def median_step(name: str, train: bool, channels_last: bool, n: int = 6) -> float:
    m = create_model(name, num_classes=10)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        if train:
            m.train()
            out = m(x)
            loss = F.cross_entropy(out if torch.is_tensor(out) else out[0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            m.eval()
            with torch.no_grad():
                m(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.set_num_threads(1)
    for cl in (False, True):
        for name, train in (("resnet8", True), ("resnet20", False), ("resnet20", True)):
            t = median_step(name, train, cl)
            print(
                f"{name} {'train' if train else 'forward'} {'channels_last' if cl else 'nchw'} {t:.3f} s"
            )


if __name__ == "__main__":
    main()
