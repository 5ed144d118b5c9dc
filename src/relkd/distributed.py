"""torch.distributed helpers that degrade to no-ops in a single process, and the process group's
description from the launcher's environment (torchrun, or Slurm's ``srun``)."""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

import torch
import torch.distributed as dist

#: The variables torchrun sets and ``init_process_group(init_method="env://")`` reads.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order, as ``scontrol show hostnames`` prints them:
    ``"node[01-03,07],gpu-a"`` -> ``node01 node02 node03 node07 gpu-a``; several bracket groups
    in one name expand as a product (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``); zero padding
    of a range is kept."""
    names: list[str] = []
    # split on the commas that are outside brackets
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        parts = [""]
        for prefix, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [""]
            if group:
                choices = []
                for rng in group.split(","):
                    lo, _, hi = rng.partition("-")
                    if not hi:
                        choices.append(lo)
                        continue
                    if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                        raise ValueError(f"node list {nodelist!r}: bad range {rng!r}")
                    choices += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
            parts = [p + prefix + c for p in parts for c in choices]
        names += [p for p in parts if p]
    return names


def slurm_process_group(env: MutableMapping[str, str] | None = None) -> dict[str, str] | None:
    """torchrun's variables derived from the environment of an ``srun`` task, or ``None``.

    Applies inside a job step of several tasks (``SLURM_STEP_NUM_TASKS`` > 1: the batch script
    itself is no step, so ``relkd train`` run there directly stays one process) when torchrun
    has not described a group already (``RANK`` set: torchrun wins). Rank = ``SLURM_PROCID``,
    world size = the step's task count, local rank = ``SLURM_LOCALID``, master = the first host
    of the step's node list (rank 0 runs there), port = ``MASTER_PORT`` if set, else
    ``20000 + (job id % 4000) * 10 + step id % 10`` (the same in every task of a step, different
    for concurrent steps of one job and, mostly, for jobs sharing a node)."""
    env = os.environ if env is None else env
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS") or 0) <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job = int(env.get("SLURM_JOB_ID") or 0)
    step = int(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(nodes)[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + (job % 4000) * 10 + step % 10),
    }


def scheduler_info(env: MutableMapping[str, str] | None = None) -> dict[str, object] | None:
    """The Slurm job this process runs in (recorded in a run's ``run.json``), or ``None``:
    job id, array job and task id, node list, restart count (how often it was requeued)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    info: dict[str, object] = {"name": "slurm", "job_id": env["SLURM_JOB_ID"]}
    for key, var in (
        ("array_job_id", "SLURM_ARRAY_JOB_ID"),
        ("array_task_id", "SLURM_ARRAY_TASK_ID"),
        ("job_name", "SLURM_JOB_NAME"),
        ("node_list", "SLURM_JOB_NODELIST"),
        ("step_id", "SLURM_STEP_ID"),
        ("restart_count", "SLURM_RESTART_COUNT"),
    ):
        if env.get(var):
            info[key] = env[var]
    return info


def adopt_launcher_env() -> str | None:
    """Fill torchrun's variables from Slurm's when this process is an ``srun`` task of a
    multi-task step (see :func:`slurm_process_group`); returns the launcher that describes the
    group (``"torchrun"``, ``"slurm"``) or ``None`` for a single process."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    group = slurm_process_group()
    if group is None:
        return None
    os.environ.update(group)
    return "slurm"


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [b, ...] from every rank along dim 0 -> [sum b, ...] in rank order.

    The local slice keeps its autograd graph; the other ranks' slices are constants (their
    gradients are computed on their own ranks). Ranks may hold different batch sizes.
    """
    if not is_dist() or world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    bmax = max(sizes_i)
    padded = x.new_zeros((bmax, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes_i)]
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def global_batch_term(loss: torch.Tensor) -> torch.Tensor:
    """Value unchanged, gradient multiplied by the world size.

    A term computed on the all-gathered batch has the same value on every rank, but each rank only
    back-propagates into its local slice and DDP then *averages* gradients over ranks; scaling the
    gradient by W makes the averaged gradient equal the single-process gradient of the global batch.
    """
    w = world_size()
    if w == 1:
        return loss
    return loss + (w - 1) * (loss - loss.detach())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def local_rows(global_t: torch.Tensor, n_local: int) -> torch.Tensor:
    """This rank's rows of a tensor built for the all-gathered batch (rank order).

    Random draws that a method makes per sample (CRD negatives, CORSD's wrong classes) are
    drawn for the *global* batch with the RNG that every rank holds in the same state, then
    sliced: N ranks then draw exactly what one process at the global batch draws.
    """
    if not is_dist() or world_size() == 1:
        return global_t
    n = torch.tensor([n_local], device=global_t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    start = int(sum(int(s.item()) for s in sizes[: rank()]))
    return global_t[start : start + n_local]


def on_global_batch(fn, *xs: torch.Tensor) -> torch.Tensor:
    """``fn(*xs)`` for a loss that relates the samples of a batch to each other (SP, RKD, PKT,
    CC, ...), computed on the batch gathered from every rank: the value equals one process at
    the global batch, and :func:`global_batch_term` makes the DDP-averaged gradient equal too."""
    if not is_dist() or world_size() == 1:
        return fn(*xs)
    return global_batch_term(fn(*(all_gather_with_grad(x) for x in xs)))
