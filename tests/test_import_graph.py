"""The import graph of ``src/relkd`` (parsed with ``ast``, nothing imported): the layering of
docs/architecture.md holds, there is no import cycle, no private name is imported across a
package, and no module is over the size limit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: The layers, lowest first (docs/architecture.md, "Layers"). A module may import from its own
#: layer (without a cycle) and from lower ones, never from a higher one. A name matches a module
#: and everything under it; the longest matching name decides.
LAYERS: list[tuple[str, ...]] = [
    (
        "relkd._fs",
        "relkd._version",
        "relkd._yaml",
        "relkd.registry",
        "relkd.distributed",
        "relkd.plugins",
        "relkd.claims",
        "relkd.progress",
    ),
    ("relkd.config", "relkd.resources"),
    ("relkd.models", "relkd.losses"),
    ("relkd.data",),
    ("relkd.methods",),
    ("relkd.preflight",),
    ("relkd.engine",),
    ("relkd.api", "relkd.probe", "relkd.probe_data", "relkd.probe_model", "relkd.deploy"),
    ("relkd",),  # the package: relkd.train and the public names
    ("relkd.bench", "relkd.demo", "relkd.cli", "relkd.__main__"),
]
MAX_LINES = 600
MAX_TRAINER_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "relkd").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module imported, name imported or None, line)`` of every run-time relkd import of a
    module, at any depth (a function-level import counts: it runs when the function does)."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "relkd":
                continue
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:  # `from relkd import distributed`
                    out.append((full, None, node.lineno))
                else:
                    out.append((_resolve(node.module), a.name, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "relkd":
                    out.append((_resolve(a.name), None, node.lineno))
    return out


def _layer(name: str) -> int:
    best, layer = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and len(n) > best:
                best, layer = len(n), i
    assert layer >= 0, f"{name} is in no layer: add it to LAYERS and docs/architecture.md"
    return layer


def _edges() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def test_no_module_imports_from_a_higher_layer():
    bad = [
        f"{m}:{line} imports {t} (layer {_layer(t)} > {_layer(m)})"
        for m in sorted(MODULES)
        for t, _, line in _imports(m)
        if _layer(t) > _layer(m)
    ]
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    edges = _edges()
    # A package's __init__ re-exporting its modules is not a cycle with them: a module never
    # needs its own package's __init__ (Python runs it first anyway), so those edges are dropped.
    for m, ts in edges.items():
        edges[m] = {t for t in ts if not m.startswith(t + ".")}
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_two_module_circle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or name in _PACKAGES else name


_PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def test_no_private_name_crosses_a_package():
    """``from relkd.x.y import _name`` only between the modules of one package (a file split of
    it); from any other package or top-level module a private name is an error."""
    bad = []
    for m in sorted(MODULES):
        for t, name, line in _imports(m):
            private = bool(name) and name.startswith("_") and not name.startswith("__")
            if private and (_package(t) != _package(m) or _package(m) == m):
                bad.append(f"{m}:{line} imports {name} from {t}")
    assert not bad, "\n".join(bad)


def test_module_sizes():
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert lines["relkd.engine.trainer"] < MAX_TRAINER_LINES
    over = {m: n for m, n in lines.items() if n > MAX_LINES}
    assert not over, over


@pytest.mark.parametrize("layered", ["relkd.engine.build", "relkd.data.replay", "relkd._fs"])
def test_layer_lookup_is_by_the_longest_name(layered):
    assert (
        _layer(layered)
        == {"relkd.engine.build": 6, "relkd.data.replay": 3, "relkd._fs": 0}[layered]
    )
