"""Published top-1 numbers (%) that :mod:`relkd.bench.report` prints beside ours.

Each table is a plain dict::

    {
        "dataset": "cifar100",      # matched against the run's data.name (or the suite's `reference`)
        "label":   "CRD",           # short name shown in the report
        "source":  "...",           # where the numbers come from
        "metric":  "last",          # which epoch the source reports: last | best | unspecified
        "recipe":  {...},           # the training recipe behind the numbers (see RECIPE_KEYS)
        "rows":    {method: {(teacher, student): top1}},
    }

Method keys are relkd method names (``"ce"`` is the plain student, ``"teacher"`` the teacher);
model names are relkd zoo names (``"wrn_40_2"``, ``"MobileNetV2"``, ``"torchvision:resnet18"``).
A missing entry means the source has no number there (e.g. FSP for wrn_40_2 -> wrn_40_1).

A number is printed only beside runs of its own recipe (:func:`recipe_matches`: the same epochs,
batch size and schedule, the full training set, no step cap): a 2-epoch smoke run is not compared
with a 240-epoch table.

Sources (the papers and repositories named below):

* CRD: Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020,
  arXiv 1910.10699, Tables 1 and 2, as listed by RepDistiller (the CRD authors' code).
  RepDistiller reports the accuracy of the LAST epoch.
* DKD: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022,
  arXiv 2203.08679, as published with mdistiller: BEST epoch, mean of 5 runs on CIFAR-100 and 3
  on ImageNet. resnet110 -> resnet20 is not in the DKD paper; that number is from the LS-KD
  table (logit standardisation, same codebase).
* RRD: Giakoumoglou, Stathaki, "Relational Representation Distillation", arXiv 2407.12073, the
  numbers of the official repository's README (Sep-Nov 2024, taken to match paper v3/v4). The
  README does not say whether they are last- or best-epoch accuracies.
* ImageNet: mdistiller's table (DKD paper, arXiv 2203.08679): best epoch, mean of 3 runs; the
  "ce" and "teacher" rows are torchvision's pretrained weights, not runs of the recipe.
"""

from __future__ import annotations

from typing import Any

Pair = tuple[str, str]

#: The 13 teacher -> student pairs of the CRD table, in the paper's column order.
CRD_PAIRS: list[Pair] = [
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
]

#: The fields of a recipe that decide whether a published number is comparable with a run.
RECIPE_KEYS = ("epochs", "batch", "schedule", "subset", "steps_per_epoch")

#: RepDistiller / mdistiller's CIFAR-100 recipe (CRD, DKD and RRD use it): 240 epochs, batch 64,
#: lr 0.05 (0.01 for MobileNetV2 / ShuffleNets) divided by 10 at epochs 150, 180 and 210.
CIFAR100_RECIPE: dict[str, Any] = {
    "epochs": 240,
    "batch": 64,
    "schedule": "multistep 150,180,210 ×0.1",
    "subset": None,
    "steps_per_epoch": None,
}
#: mdistiller's ImageNet recipe: 100 epochs, batch 512, lr 0.2 divided by 10 at 30, 60, 90.
IMAGENET_RECIPE: dict[str, Any] = {
    "epochs": 100,
    "batch": 512,
    "schedule": "multistep 30,60,90 ×0.1",
    "subset": None,
    "steps_per_epoch": None,
}


def recipe_matches(table: dict[str, Any], recipe: dict[str, Any] | None) -> bool:
    """Whether a run of ``recipe`` (the report's recipe dict) is comparable with ``table``."""
    want = table.get("recipe")
    if recipe is None or want is None:
        return recipe is None  # no recipe given: every table (tests, exploring the tables)
    return all(recipe.get(k) == want[k] for k in RECIPE_KEYS)


_SAME = CRD_PAIRS[:7]  # same-architecture pairs (CRD Table 1)
_CROSS = CRD_PAIRS[7:]  # different-architecture pairs (CRD Table 2)


def _row(pairs: list[Pair], values: list[float | None]) -> dict[Pair, float]:
    assert len(pairs) == len(values)
    return {p: v for p, v in zip(pairs, values) if v is not None}


_CRD_SAME: dict[str, list[float | None]] = {
    "teacher": [75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64],
    "ce": [73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36],
    "kd": [74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98],
    "fitnet": [73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02],
    "at": [74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43],
    "sp": [73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68],
    "cc": [73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71],
    "vid": [74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23],
    "rkd": [73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48],
    "pkt": [74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88],
    "ab": [72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94],
    "ft": [73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58],
    "fsp": [72.91, None, 69.95, 70.11, 71.89, 72.62, 70.23],
    "nst": [73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53],
    "crd": [75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94],
}
_CRD_CROSS: dict[str, list[float | None]] = {
    "teacher": [74.64, 79.34, 79.34, 79.42, 79.42, 75.61],
    "ce": [64.60, 64.60, 70.36, 70.50, 71.82, 70.50],
    "kd": [67.37, 67.35, 73.81, 74.07, 74.45, 74.83],
    "crd": [69.73, 69.11, 74.30, 75.11, 75.65, 76.05],
}

CRD_TABLE: dict[str, Any] = {
    "dataset": "cifar100",
    "label": "CRD",
    "source": "CRD (Tian et al., ICLR 2020, arXiv 1910.10699), Tables 1-2 as listed by "
    "RepDistiller; last epoch",
    "metric": "last",
    "recipe": CIFAR100_RECIPE,
    "rows": {
        m: {**_row(_SAME, v), **(_row(_CROSS, _CRD_CROSS[m]) if m in _CRD_CROSS else {})}
        for m, v in _CRD_SAME.items()
    },
}

DKD_TABLE: dict[str, Any] = {
    "dataset": "cifar100",
    "label": "DKD",
    "source": "DKD (Zhao et al., CVPR 2022, arXiv 2203.08679) via mdistiller; best epoch, mean "
    "of 5 runs; resnet110->resnet20 from the LS-KD table",
    "metric": "best",
    "recipe": CIFAR100_RECIPE,
    "rows": {
        "dkd": _row(
            CRD_PAIRS,
            [
                *[76.23, 74.81, 71.97, 71.06, 74.11, 76.32, 74.68],
                *[69.71, 70.35, None, 76.45, 77.07, 76.70],
            ],
        )
    },
}

RRD_TABLE: dict[str, Any] = {
    "dataset": "cifar100",
    "label": "RRD",
    "source": "RRD (Giakoumoglou & Stathaki, arXiv 2407.12073), official repository README "
    "(Sep-Nov 2024, paper v3/v4); last/best epoch not stated",
    "metric": "unspecified",
    "recipe": CIFAR100_RECIPE,
    "rows": {
        "rrd": _row(
            CRD_PAIRS,
            [
                *[75.33, 73.55, 70.71, 70.72, 73.10, 74.48, 73.99],
                *[67.93, 68.84, 74.01, 74.11, 74.80, 74.98],
            ],
        ),
        "rrd+kd": _row(
            CRD_PAIRS,
            [
                *[75.66, 74.67, 72.19, 71.74, 73.54, 75.08, 74.32],
                *[69.98, 69.13, 74.26, 75.18, 76.83, 76.31],
            ],
        ),
    },
}

_R34_R18: Pair = ("torchvision:resnet34", "torchvision:resnet18")
#: MobileNetV1 is not in torchvision; the key names the paper's model so that no run of a
#: different student (the shipped ImageNet suite uses torchvision:mobilenet_v2) is matched to it.
_R50_MV1: Pair = ("torchvision:resnet50", "MobileNetV1")

IMAGENET_TABLE: dict[str, Any] = {
    "dataset": "imagenet",
    "label": "mdistiller",
    "source": "mdistiller / DKD (arXiv 2203.08679) ImageNet table; best epoch, mean of 3 runs; "
    "teacher and student rows are torchvision's pretrained weights (KD R34->R18 is often quoted "
    "as 70.66, the CRD paper's number)",
    "metric": "best",
    "recipe": IMAGENET_RECIPE,
    "rows": {
        "teacher": {_R34_R18: 73.31, _R50_MV1: 76.16},
        "ce": {_R34_R18: 69.76, _R50_MV1: 68.87},
        "kd": {_R34_R18: 71.03, _R50_MV1: 70.50},
        "dkd": {_R34_R18: 71.70, _R50_MV1: 72.05},
    },
}

#: Every table, by key.
TABLES: dict[str, dict[str, Any]] = {
    "crd": CRD_TABLE,
    "dkd": DKD_TABLE,
    "rrd": RRD_TABLE,
    "imagenet": IMAGENET_TABLE,
}


def lookup(
    dataset: str,
    method: str,
    teacher: str | None,
    student: str,
    recipe: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Reference numbers for one (method, teacher, student) on ``dataset``.

    Teacher-free rows (``teacher=None``, e.g. the plain ``ce`` student) match any pair with the
    same student. ``method="teacher"`` looks up the teacher's own accuracy by ``student`` being
    the teacher's name. With ``recipe``, only tables of the same recipe answer
    (:func:`recipe_matches`). Returns ``[{"value", "table", "label", "metric", "source"}, ...]``.
    """
    out = []
    for key, table in TABLES.items():
        if table["dataset"] != dataset or not recipe_matches(table, recipe):
            continue
        row = table["rows"].get(method)
        if not row:
            continue
        if method == "teacher":
            values = [v for (t, _s), v in row.items() if t == student]
        elif teacher is None:
            values = [v for (_t, s), v in row.items() if s == student]
        else:
            values = [row[(teacher, student)]] if (teacher, student) in row else []
        if values:
            out.append(
                {
                    "value": values[0],
                    "table": key,
                    "label": table["label"],
                    "metric": table["metric"],
                    "source": table["source"],
                }
            )
    return out
