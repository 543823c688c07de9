"""The house rules, checked: dependencies point down, no import cycles, no module imports another
package's `_private` names, no repeated blocks of code."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "medmerge"
LOWER = ("data", "train", "merge")  # capabilities that must not reach up
UPPER = ("evaluate", "export", "pipeline", "federated")
MIN_REPEATED_LINES = 6


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module under src/medmerge (packages by their __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """{module: modules of medmerge it imports}, at module level or inside functions alike."""
    modules = _modules()

    def owner(name: str) -> str | None:  # the longest module prefix of an imported name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                stem = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(parts + ([stem] if stem else []))
                names = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
            else:
                continue
            for name in names:
                target = owner(name)
                if target and target != module and not target.startswith(module + "."):
                    graph[module].add(target)
    return graph


def _layer(module: str) -> str:
    return (module.split(".") + [""])[1]


def test_lower_layers_never_import_upper_ones() -> None:
    upward = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if _layer(m) in LOWER and _layer(t) in UPPER
    ]
    assert upward == []


def test_federated_never_imports_pipeline() -> None:
    """The federation shares the recipe and the search loop through medmerge.merge, and the verdict's
    statistics through medmerge.evaluate, never through `medmerge run`'s pipeline."""
    reached = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if _layer(m) == "federated" and _layer(t) == "pipeline"
    ]
    assert reached == []


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def private_imports(files: dict[str, Path]) -> list[str]:
    """`module imports target._name` for every import of a `_private` name (dunders are public) that
    another package defines: a package's private names are its own (its modules share them)."""
    found = []
    for module, path in files.items():
        package = _package(module, path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("medmerge"):
                continue
            target = node.module or ""
            owner = _package(target, files[target]) if target in files else target
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.endswith("__")
                if private and owner != package:
                    found.append(f"{module} imports {target}.{alias.name}")
    return found


def test_private_import_finder_finds_a_planted_one(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    lib, same, other = tmp_path / "a" / "lib.py", tmp_path / "a" / "same.py", tmp_path / "b.py"
    lib.write_text("def _hidden():\n    return 1\n")
    same.write_text("from medmerge.a.lib import _hidden\n")
    other.write_text("from medmerge.a.lib import _hidden, __version__\n")
    files = {"medmerge.a.lib": lib, "medmerge.a.same": same, "medmerge.b": other}
    assert private_imports(files) == ["medmerge.b imports medmerge.a.lib._hidden"]


def test_no_module_imports_another_packages_private_names() -> None:
    assert private_imports(_modules()) == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert find_cycles(import_graph()) == []


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: no blanks, comments or docstrings."""
    text = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and number not in docstrings:
            lines.append((number, stripped))
    return lines


_TRIVIAL = re.compile(r"^[\)\]\},:]*$|^(else|try|finally):$|^(return|pass|continue|break)$|^from |^import ")


def repeated_blocks(files: list[Path], root: Path = SRC, size: int = MIN_REPEATED_LINES) -> list[str]:
    """Places where `size` consecutive code lines (stripped) occur again, in the same or another file.

    Windows made only of brackets, imports and bare keywords are not counted.
    """
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in files:
        lines = _code_lines(path)
        for i in range(len(lines) - size + 1):
            window = tuple(text for _, text in lines[i : i + size])
            if sum(not _TRIVIAL.match(t) for t in window) < size - 1:
                continue
            seen[window].append(f"{path.relative_to(root)}:{lines[i][0]}")
    return [" ~ ".join(places) for places in seen.values() if len(places) > 1]


def test_repeat_finder_finds_a_planted_repeat(tmp_path: Path) -> None:
    block = "\n".join(f"    x{i} = compute({i}, y)" for i in range(MIN_REPEATED_LINES))
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(f"def f(y):\n{block}\n    return x0\n")
    b.write_text(f"def g(y):\n    z = 1\n{block}\n    return z\n")
    assert len(repeated_blocks([a, b], tmp_path)) == 1
    b.write_text("def g(y):\n    return y\n")
    assert repeated_blocks([a, b], tmp_path) == []


def test_no_block_of_code_is_repeated() -> None:
    assert repeated_blocks(sorted(PACKAGE.rglob("*.py"))) == []


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_exist(layer: str) -> None:
    assert (PACKAGE / layer / "__init__.py").is_file()
