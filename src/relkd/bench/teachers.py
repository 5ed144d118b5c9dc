"""The teacher's own test top-1 for the report, found once per teacher and remembered.

A distillation table is read against its teacher, so :func:`teacher_top1` finds the number from
the first of these that exists:

1. the teacher trained by a suite (``<suite out>/teachers/<name>/summary.json``): the students
   load its final weights, so its last-epoch top-1;
2. ``teacher_top1`` in a run's ``summary.json`` (a run folder that recorded its teacher's
   accuracy, e.g. of a teacher passed to :func:`relkd.train` as an ``nn.Module``);
3. a checkpoint written by relkd (``student.pt`` / ``student_best.pt`` / ``.safetensors`` of a
   run folder): that run's ``summary.json`` (last or best epoch), if it was tested on the same
   data set;
4. otherwise the checkpoint is evaluated once on the run's test split (CPU or the first GPU) and
   the result kept in a JSON cache beside the report, keyed by the checkpoint's path, size and
   modification time and the data set, so a second report does not evaluate it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _from_run_folder(ckpt: Path, data_name: str) -> dict[str, Any] | None:
    """The accuracy a relkd run recorded for the weights it saved as ``ckpt``."""
    import yaml

    from relkd._yaml import strict_load

    summary = _read_json(ckpt.parent / "summary.json")
    if not isinstance(summary, dict) or summary.get("best_top1") is None:
        return None
    try:
        cfg = strict_load((ckpt.parent / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if (cfg.get("data") or {}).get("name") != data_name:
        return None  # tested on another data set: not this table's number
    if ckpt.stem == "student_best":
        return {
            "top1": float(summary["best_top1"]),
            "how": "read from the checkpoint's run folder, best epoch",
        }
    if ckpt.stem == "student":
        return {
            "top1": float(summary["last_top1"]),
            "how": "read from the checkpoint's run folder, last epoch",
        }
    return None


def evaluate_checkpoint(
    model_name: str,
    kwargs: dict[str, Any],
    ckpt: Path,
    data: dict[str, Any],
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> float:
    """Top-1 (%) of the checkpoint ``ckpt`` of ``model_name`` on the test split of ``data`` (a
    config's ``data`` section: name, root, image_size, eval_batch_size), its inputs normalised as
    training normalises a teacher (``mean`` / ``std``: the config's ``teacher.mean`` / ``.std``;
    else declared by the model, else recorded with the checkpoint, else the data's)."""
    import torch

    from relkd.data import build_datasets
    from relkd.engine.build import model_kwargs
    from relkd.models import create_model, load_checkpoint
    from relkd.models.input_check import teacher_input
    from relkd.models.normalization import attach_input_norm

    _, test_ds, info = build_datasets(
        data["name"], data.get("root"), augment=False, image_size=data.get("image_size")
    )
    # in_chans as training passes it (zoo names, import paths: where the factory takes it)
    kw = model_kwargs(model_name, kwargs or {}, info.in_channels)
    model = create_model(model_name, info.num_classes, **kw)
    load_checkpoint(model, ckpt)
    # One normalisation rule for every entry point (relkd.models.input_check / normalization).
    (t_mean, t_std), _ = teacher_input(model, model_name, str(ckpt), mean, std, info)
    attach_input_norm(model, info.mean, info.std, t_mean, t_std)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        test_ds, batch_size=int(data.get("eval_batch_size") or 256)
    )
    hits = n = 0
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            hits += int((model(x).float().argmax(1) == y).sum())
            n += y.numel()
    return 100.0 * hits / max(1, n)


def teacher_top1(
    name: str,
    run_cfg: dict[str, Any],
    *,
    teachers_dir: Path | None = None,
    summary: dict[str, Any] | None = None,
    cache: Path | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """``{"top1": float | None, "how": str}`` for the teacher ``name`` of a run whose resolved
    config is ``run_cfg`` (``how`` says where the number comes from, or why there is none)."""
    if teachers_dir is not None:
        s = _read_json(teachers_dir / name.replace(":", "-").replace("/", "-") / "summary.json")
        if isinstance(s, dict) and s.get("last_top1") is not None:
            how = f"trained by the suite, last epoch; best {s['best_top1']:.2f}"
            return {"top1": float(s["last_top1"]), "how": how}
    if summary and summary.get("teacher_top1") is not None:
        return {"top1": float(summary["teacher_top1"]), "how": "recorded by the run"}
    tcfg = run_cfg.get("teacher") or {}
    data = run_cfg.get("data") or {}
    if not tcfg.get("checkpoint"):
        why = (
            "the run recorded no accuracy for its nn.Module teacher"
            if not tcfg
            else "no checkpoint in the run's config"
        )
        return {"top1": None, "how": f"not recorded ({why})"}
    ckpt = Path(str(tcfg["checkpoint"])).expanduser()
    if not ckpt.is_file():
        return {"top1": None, "how": f"not recorded (checkpoint {ckpt} not found)"}
    found = _from_run_folder(ckpt, str(data.get("name")))
    if found:
        return found
    st = ckpt.stat()
    key = f"{ckpt.resolve()}|{st.st_size}|{st.st_mtime_ns}|{data.get('name')}|{data.get('image_size')}"
    known = (_read_json(cache) or {}) if cache else {}
    if key in known:
        return {"top1": float(known[key]), "how": "evaluated on the test split"}
    if not evaluate:
        return {"top1": None, "how": "not evaluated (teacher evaluation switched off)"}
    if data.get("root") and not Path(str(data["root"])).expanduser().exists():
        return {"top1": None, "how": f"not evaluated (data root {data['root']} not found)"}
    top1 = evaluate_checkpoint(
        str(tcfg.get("name") or name), tcfg.get("kwargs") or {}, ckpt, data,
        tcfg.get("mean"), tcfg.get("std"),
    )  # fmt: skip
    if cache is not None:
        known[key] = top1
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2))
        os.replace(tmp, cache)
    return {"top1": top1, "how": "evaluated on the test split"}
