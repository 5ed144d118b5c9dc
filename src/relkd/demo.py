"""The CPU demo: distil on Fashion-MNIST and print the comparison table (README's main command).

A ``cnn_small`` teacher is trained once with CE (and reused while its config is unchanged); the
same ``cnn_tiny`` student is then trained with each demo method at the same budget. The table
(test top-1, last and best epoch, mean +- std over seeds) is printed and written with a PNG bar
chart to the output folder.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from relkd.config import load_config, to_yaml

#: Demo methods and their config overrides by section. A new method adds a line here.
DEMO_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "ce": {},
    "kd": {},
    "dkd": {"method": {"args": {"warmup": 1}}},  # the 20-epoch warm-up is for 240 epochs
    "dist": {"method": {"args": {"temperature": 4.0, "beta": 2.0, "gamma": 2.0}}},
    "clkd": {},
    "cmkd": {},
    "rrd": {"method": {"args": {"queue_size": 4096}}},  # smaller than the 10k training images
    "crd": {"method": {"args": {"nce_k": 4096}}},
    # self-distillation, same student, no teacher; a batch holds 43 triplets = 129 images
    "corsd": {"data": {"batch_size": 43}},
}

TEACHER_EPOCHS = 3
STUDENT_EPOCHS = 4
STUDENT_SUBSET = 10_000


def _base(root: str | None) -> dict[str, Any]:
    return {
        "data": {"name": "fashion_mnist", "root": root, "batch_size": 128, "in_memory": "auto"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "onecycle"},
        "train": {"progress": False, "tensorboard": False},
    }


def teacher_config(out: Path, root: str | None) -> dict[str, Any]:
    cfg = _base(root)
    cfg.update(
        student={"name": "cnn_small"},
        method={"name": "ce"},
        output_dir=str(out),
        name="teacher",
    )
    cfg["train"].update(epochs=TEACHER_EPOCHS, seed=0)
    return cfg


def student_config(
    out: Path, root: str | None, method: str, seed: int, epochs: int, teacher_ckpt: Path
) -> dict[str, Any]:
    cfg = _base(root)
    cfg["data"]["train_subset"] = STUDENT_SUBSET
    cfg.update(
        student={"name": "cnn_tiny"},
        teacher={"name": "cnn_small", "checkpoint": str(teacher_ckpt)},
        method={"name": method},
        output_dir=str(out),
        name=f"{method}_s{seed}",
    )
    cfg["train"].update(epochs=epochs, seed=seed)
    for section, values in DEMO_METHODS.get(method, {}).items():
        cfg[section].update(values)
    return cfg


def _same_run(saved: Path, cfg: dict[str, Any]) -> bool:
    """Whether the config saved in a run folder trains what ``cfg`` trains: display settings
    (``train.progress``) do not count, so a teacher trained with or without a bar is reused."""
    try:
        old = load_config(saved)
    except Exception:  # an unreadable or outdated config.yaml: train again
        return False
    new = load_config(cfg)
    old.train.progress = new.train.progress
    return to_yaml(old) == to_yaml(new)


def ensure_teacher(out: Path, root: str | None, quiet: bool = False) -> tuple[Path, float]:
    """Train the demo teacher, or reuse the one in ``out/teacher`` if its config is the same.

    The teacher is the long part of the demo (minutes on a CPU), so unless ``quiet`` its
    progress bar and per-epoch lines are shown.
    """
    from relkd import train

    cfg = teacher_config(out, root)
    cfg["train"]["progress"] = not quiet
    run = out / "teacher"
    summary = run / "summary.json"
    cfg_file = run / "config.yaml"
    reusable = summary.exists() and cfg_file.exists() and (run / "student.pt").exists()
    if reusable and _same_run(cfg_file, cfg):
        return run / "student.pt", json.loads(summary.read_text())["last_top1"]
    if run.exists():
        shutil.rmtree(run)
    if not quiet:
        print(f"  training the teacher ({TEACHER_EPOCHS} epochs; reused by later demo runs)")
    res = train(cfg, quiet=quiet)
    return run / "student.pt", res["last_top1"]


def _fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} +- {statistics.stdev(xs):.2f}"


def run_demo(
    out_dir: str = "runs/demo",
    seeds: int = 1,
    methods: list[str] | None = None,
    root: str | None = None,
    student_epochs: int | None = None,
    quiet: bool = True,
    teacher_quiet: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns ``{"teacher_top1", "rows": {method: {"last": [...], "best": [...]}}}``.

    ``quiet``: no per-epoch output of the students (one line per run is printed when it is
    done); ``teacher_quiet``: the same for the teacher, whose progress is shown by default.
    """
    from relkd import train
    from relkd.methods import MethodSpec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = methods or list(DEMO_METHODS)
    for m in methods:
        MethodSpec.parse(m)  # fail before any training on an unknown name
    epochs = student_epochs or STUDENT_EPOCHS
    t0 = time.time()
    print(f"relkd demo: Fashion-MNIST, teacher cnn_small, student cnn_tiny, {seeds} seed(s)")
    ckpt, t_top1 = ensure_teacher(out, root, quiet=quiet and teacher_quiet)
    print(
        f"  teacher cnn_small: top-1 {t_top1:.2f} on the test split ({time.time() - t0:.0f} s so far)"
    )
    rows: dict[str, dict[str, list[float]]] = {}
    n_test: set[int] = set()
    for seed in range(seeds):
        for m in methods:
            run = out / f"{m}_s{seed}"
            if run.exists():
                shutil.rmtree(run)
            # The run's name first, its result when done: a long run (CRD) is never silent.
            print(f"  {m:<10} seed {seed}: ", end="" if quiet else "\n", flush=True)
            res = train(student_config(out, root, m, seed, epochs, ckpt), quiet=quiet)
            r = rows.setdefault(m, {"last": [], "best": []})
            r["last"].append(res["last_top1"])
            r["best"].append(res["best_top1"])
            n_test.add(res["eval_images"])
            print(
                ("" if quiet else f"  {m:<10} seed {seed}: ")
                + f"last {res['last_top1']:.2f} best {res['best_top1']:.2f}"
                f" ({time.time() - t0:.0f} s so far)"
            )
    lines = [
        f"Fashion-MNIST, teacher cnn_small ({t_top1:.2f}), student cnn_tiny, {epochs} epochs on "
        f"{STUDENT_SUBSET} training images, {seeds} seed(s); top-1 % on the test split "
        f"({'/'.join(str(n) for n in sorted(n_test))} images)",
        "",
        "| method | last top-1 | best top-1 |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {_fmt(r['last'])} | {_fmt(r['best'])} |" for m, r in rows.items()]
    table = "\n".join(lines)
    print()
    print(table)
    result = {"teacher_top1": t_top1, "epochs": epochs, "seeds": seeds, "rows": rows}
    result.update(eval_split="test", eval_images=sorted(n_test)[0] if len(n_test) == 1 else None)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _plot(rows, out / "results.png", t_top1)
    print(f"\nwrote {out / 'results.md'} and {out / 'results.png'} in {time.time() - t0:.0f} s")
    result["verdict"] = verdict(rows, t_top1)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(result["verdict"])  # last: the line a person reads first
    return result


def verdict(rows: dict[str, dict[str, list[float]]], teacher_top1: float) -> str:
    """One line: what the student saves against its teacher (parameters, batch-1 CPU latency
    measured now, :mod:`relkd.deploy.profile`) and what the best distillation method gains over
    plain training and loses to the teacher (mean last-epoch test top-1)."""
    from relkd.deploy.profile import machine_label, profile_model, ratios

    kw = {"num_classes": 10, "batches": (1,), "devices": ["cpu"], "repeats": 50, "warmup": 10}
    s = profile_model("cnn_tiny", (1, 28, 28), **kw)
    t = profile_model("cnn_small", (1, 28, 28), **kw)
    r = ratios(s, t)
    line = (
        f"student cnn_tiny: {r['params_x']:.0f}x fewer parameters and {r['speedup'][0]['x']:.1f}x "
        f"faster than its teacher on this CPU at batch 1 ({machine_label('cpu')})"
    )
    means = {m: statistics.mean(v["last"]) for m, v in rows.items()}
    kd = {m: v for m, v in means.items() if m != "ce"}
    if kd:
        best = max(kd, key=kd.get)
        gain = f"{kd[best] - means['ce']:+.1f} over plain training, " if "ce" in means else ""
        line += f"; {best} {gain}{kd[best] - teacher_top1:+.1f} vs the teacher"
    elif "ce" in means:
        line += f"; plain training {means['ce'] - teacher_top1:+.1f} vs the teacher"
    return line + " (test top-1, last epoch)"


def _plot(rows: dict[str, dict[str, list[float]]], path: Path, teacher_top1: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    means = [statistics.mean(rows[m]["last"]) for m in names]
    errs = [statistics.stdev(rows[m]["last"]) if len(rows[m]["last"]) > 1 else 0 for m in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=errs, capsize=4, color="#4c72b0")
    ax.axhline(teacher_top1, color="grey", ls="--", lw=1, label=f"teacher {teacher_top1:.1f}")
    lo = min(means) - 3
    ax.set_ylim(max(0, lo), max(max(means), teacher_top1) + 1)
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title("relkd demo: Fashion-MNIST, cnn_small -> cnn_tiny")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
