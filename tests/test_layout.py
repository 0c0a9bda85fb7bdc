"""The package's shape, as docs/ARCHITECTURE.md asks for it: no function over 80 lines, and no import cycle among
stopsign's modules (lazy imports inside functions included). import-linter checks the layers; this checks what it
cannot: a cycle inside one layer, and length."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stopsign"
MAX_LINES = 80


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, from __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("stopsign",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def long_functions(tree: ast.AST) -> list[tuple[int, int, str]]:
    """(line, length, name) of each function or method over MAX_LINES, from its def to its body's last line."""
    return [(node.lineno, node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]


def type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`, which never run (pyproject's exclude_type_checking_imports)."""
    return {id(inner) for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for statement in node.body for inner in ast.walk(statement)}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its code (lazy imports in functions included, those
    for type checkers only not), each resolved to a module: `from . import x` names module x when x is one, and
    its package otherwise."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped = type_checking_only(tree)
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # `import a.b.c` of a name inside a module: its module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, …, a], or None."""
    state: dict[str, str] = {}  # "open" on the current path, "done" once all it reaches is explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_no_function_is_over_80_lines():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line} {function} is {length} lines"
                 for path in modules().values()
                 for line, length, function in long_functions(ast.parse(path.read_text(), str(path)))]
    assert not offenders, f"functions over {MAX_LINES} lines (split them along their steps):\n" + "\n".join(offenders)


def test_no_import_cycle():
    found = modules()
    graph = {name: imported_modules(name, path, set(found)) for name, path in found.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "an import cycle among stopsign's modules (lazy imports count): " + " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for():
    """The checks are not vacuous: a made-up long function and a made-up cycle are found."""
    long = ast.parse("def f():\n" + "    x = 1\n" * MAX_LINES)
    assert long_functions(long) == [(1, MAX_LINES + 1, "f")]
    assert long_functions(ast.parse("def f():\n" + "    x = 1\n" * (MAX_LINES - 1))) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
