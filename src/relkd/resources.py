"""The configs and benchmark suites that ship inside the package.

A pip install carries every YAML a clone has: training configs (``relkd/configs``, e.g.
``cifar100/kd/resnet32x4_resnet8x4``), probe options (``transfer/stl10``) and accuracy suites
(``relkd/suites``, named ``suites/fmnist-mini``). Wherever relkd takes a config or suite file it
also takes such a name: an existing file always wins, then the packaged name (``.yaml`` optional).
In a clone the top-level ``configs`` and ``benchmarks/suites`` are links to these folders.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

from relkd.registry import RelkdError

#: Names of packaged suites start with this prefix in listings (``suites/fmnist-mini``).
SUITES = "suites/"


def configs_dir() -> Path:
    """Folder of the packaged training and probe configs."""
    return Path(__file__).resolve().parent / "configs"


def suites_dir() -> Path:
    """Folder of the packaged accuracy suites."""
    return Path(__file__).resolve().parent / "suites"


def _names(root: Path, prefix: str = "") -> dict[str, Path]:
    return {
        prefix + p.relative_to(root).with_suffix("").as_posix(): p
        for p in sorted(root.rglob("*.yaml"))
    }


def packaged() -> dict[str, Path]:
    """Every packaged YAML by name: configs (``cifar100/ce/resnet32x4``) then suites
    (``suites/fmnist-mini``)."""
    return {**_names(configs_dir()), **_names(suites_dir(), SUITES)}


def list_packaged(prefix: str = "") -> list[str]:
    """Packaged names under the folder ``prefix`` (``cifar100/kd``: not ``cifar100/kd+cmkd``),
    else those starting with it (``cifar100/k``)."""
    p = prefix.strip("/").removesuffix(".yaml")
    names = list(packaged())
    under = [n for n in names if not p or n == p or n.startswith(p + "/")]
    return under or [n for n in names if n.startswith(p)]


def _missing(what: str, name: str, names: list[str]) -> RelkdError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return RelkdError(
        f"{what} {name!r} does not exist: no such file and no packaged {what} of that name."
        f"{hint} `relkd configs list` shows the packaged ones"
    )


def resolve(source: str | os.PathLike, *, suite: bool = False) -> Path:
    """The file a config (or, with ``suite``, a suite) argument names.

    An existing path is returned as given; otherwise ``source`` is looked up among the packaged
    names (with or without ``.yaml``; a suite with or without ``suites/``).

    Raises:
        RelkdError: neither a file nor a packaged name (close matches suggested).
    """
    p = Path(source)
    try:
        if p.is_file() or (p.exists() and not p.is_dir()):  # a FIFO or device: the reader says
            return p
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        pass
    key = str(source).strip().removesuffix(".yaml")
    table = _names(suites_dir(), SUITES) if suite else _names(configs_dir())
    if suite and not key.startswith(SUITES):
        key = SUITES + key
    if key in table:
        return table[key]
    what = "suite" if suite else "config"
    try:
        is_dir = p.is_dir()
    except (OSError, ValueError):
        is_dir = False
    if is_dir:
        raise RelkdError(
            f"{what} {str(source)!r} is a folder, not a {what} file: give a YAML file or a "
            f"packaged name (relkd configs list)"
        )
    raise _missing(
        what, str(source), [n.removeprefix(SUITES) for n in table] if suite else list(table)
    )


def copy_packaged(name: str, dest: str | os.PathLike = ".") -> list[Path]:
    """Copy a packaged YAML, or every one under a packaged folder, into ``dest``.

    ``dest`` is a folder (created): a single file lands as ``dest/<file name>``, a folder keeps
    its layout below the named folder. Existing files are never overwritten. Returns the paths
    written.
    """
    table = packaged()
    key = str(name).strip().strip("/").removesuffix(".yaml")
    out = Path(dest)
    if key in table:
        pairs = [(table[key], out / table[key].name)]
    else:
        under = {n: p for n, p in table.items() if n.startswith(key + "/")}
        if not under:
            raise _missing("name", key, list(table) + sorted({n.rsplit("/", 1)[0] for n in table}))
        pairs = [(p, out / Path(n[len(key) + 1 :] + ".yaml")) for n, p in under.items()]
    exists = [str(d) for _, d in pairs if d.exists()]
    if exists:
        raise RelkdError(f"not overwriting existing file(s): {', '.join(exists[:5])}")
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return [d for _, d in pairs]
