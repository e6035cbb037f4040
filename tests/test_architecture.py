"""The layout's rules, read from the source (``docs/architecture.md`` draws them): every import points
down the layers, no module imports itself back through others, and only ``sigec.core.pipeline``
captures a model."""
import ast
import pathlib
from typing import Iterator, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: where each top-level package's files are (``pyproject.toml``'s ``package-dir``)
PACKAGE_DIRS = {"sigec": ROOT / "sigec", "sigec.passes": ROOT / "passes", "sigec.runtime": ROOT / "runtime"}

#: (unit, module prefixes, rank), lowest first. A module may import modules of its own unit, or of a
#: unit of lower rank; two units of one rank may not import each other. The first matching prefix wins.
LAYERS = [
    ("models", ("sigec.models",), 0),              # model definitions and weights: no sigec code
    ("kernels", ("sigec.runtime.ops", "sigec.runtime.attention", "sigec.runtime.token_ops", "sigec.runtime.masks",
                 "sigec.runtime.cache", "sigec.runtime.native"), 0),
    ("ir", ("sigec.ir",), 1),                      # meta keys, analysis types, settings, cost model
    ("passes", ("sigec.passes",), 2),
    ("runners", ("sigec.runtime",), 3),            # the reference interpreter and the tiled runner
    ("core", ("sigec.core",), 4),
    ("spatial", ("sigec.spatial",), 5),
    ("tiling", ("sigec.tiling",), 5),
    ("temporal", ("sigec.temporal",), 6),          # composes spatial engines (edits=True)
    ("face", ("sigec.api", "sigec.backend", "sigec.costs", "sigec"), 7),
    ("diffusion", ("sigec.diffusion",), 8),        # built on sigec.compile
    ("frontends", ("sigec.frontends",), 9),
]


def module_files() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package] + parts)
            if name.startswith("sigec.") and name.split(".")[1] in ("passes", "runtime") and folder == ROOT / "sigec":
                continue
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module named by an import in ``tree``, at any depth (function bodies too: a lazy import
    is still a dependency), except under ``if TYPE_CHECKING:``, which never runs."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield from (f"{base}.{alias.name}" for alias in node.names)  # resolve() falls back to base
        stack.extend(ast.iter_child_nodes(node))


def resolve(name: str, modules: set) -> Optional[str]:
    """The project module an imported name lives in (``sigec.ir.meta_keys`` for ``from sigec.ir import
    meta_keys``; ``sigec.ir`` for ``from sigec.ir import something_defined_there``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set]:
    files = module_files()
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {resolve(t, modules) for t in _imports(tree, name, path.name == "__init__.py")}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def layer_of(module: str) -> tuple[str, int]:
    for unit, prefixes, rank in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return unit, rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")


def direction_violations(graph: dict[str, set]) -> list[str]:
    bad = []
    for importer, targets in sorted(graph.items()):
        unit, rank = layer_of(importer)
        for target in sorted(targets):
            t_unit, t_rank = layer_of(target)
            if t_unit != unit and t_rank >= rank:
                bad.append(f"{importer} ({unit}) imports {target} ({t_unit})")
    return bad


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict = {}
    low: dict = {}
    on_stack: set = set()
    stack: list = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    for module in module_files():
        layer_of(module)


def test_imports_point_down_the_layers():
    bad = direction_violations(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_the_checks_can_fail():
    """The checks themselves: an upward import and a cycle are reported."""
    assert direction_violations({"sigec.ir.plan": {"sigec.core.engine"}, "sigec.core.engine": set()})
    assert direction_violations({"sigec.tiling.mode": {"sigec.spatial.build"}, "sigec.spatial.build": set()})
    assert not direction_violations({"sigec.temporal.engine": {"sigec.spatial.build"}})
    assert cycles({"sigec.api": {"sigec.temporal"}, "sigec.temporal": {"sigec.api"}}) == [["sigec.api", "sigec.temporal"]]
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("elsewhere.module")


def test_only_the_pipeline_captures():
    """``capture(...)`` is called in one place; every mode receives the captured program."""
    callers = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "capture":
                callers.append(f"{name}:{node.lineno}")
    assert len(callers) == 1 and callers[0].startswith("sigec.core.pipeline:"), callers


def test_every_package_is_installed():
    """A package folder missing from pyproject's list works in a checkout and is absent from a wheel."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert folders - {"sigec.csrc"} <= declared, f"packages missing from pyproject.toml: {sorted(folders - declared)}"
