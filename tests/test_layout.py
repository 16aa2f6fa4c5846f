"""The package's layout rules, read from the source: imports go one way, with no circle anywhere
in `cvtkit/` (imports inside functions count), `cvtkit.data` never imports `cvtkit.prep`, and no
module or function outgrows what a reader takes in at once."""
import ast
import functools
import json
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "cvtkit"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Every cvtkit module that `path` imports, at any depth of its code. `from pkg import sub`
    counts `pkg.sub` where that is a module; importing `a.b.c` from outside package `a.b` also
    runs `a.b`'s `__init__`, which counts."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target not in known:
                continue
            found.add(target)
            parent = target.rpartition(".")[0]
            while parent and parent != "cvtkit" and not package.startswith(parent):
                found.add(parent)
                parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


def _graph_here() -> dict[str, list[str]]:
    mods = modules()
    return {name: sorted(imported_modules(path, name, set(mods))) for name, path in mods.items()}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Read in a fresh interpreter: CPython 3.11's `ast.parse` can fail with "AST constructor
    recursion depth mismatch" inside a long test process (after numba, say)."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, check=True).stdout
    return {name: set(deps) for name, deps in json.loads(out).items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package_counting_imports_inside_functions():
    assert cycles(import_graph()) == []


def test_the_circle_check_sees_an_import_inside_a_function():
    graph = {"a": {"b"}, "b": set()}
    assert cycles(graph) == []
    graph["b"].add("a")
    assert cycles(graph) == [["a", "b"]]
    # and the parser reads imports at any depth, relative ones included
    source = "def f():\n    from .shards import INFO_FILE\n"
    tmp = PACKAGE.parent / "cvtkit_layout_probe.py"
    try:
        tmp.write_text(source)
        assert imported_modules(tmp, "cvtkit.prep.probe", {"cvtkit.prep.shards"}) == {"cvtkit.prep.shards"}
    finally:
        tmp.unlink()


def test_training_data_never_imports_shard_making():
    offenders = {name: sorted(d for d in deps if d.startswith("cvtkit.prep"))
                 for name, deps in import_graph().items() if name.startswith("cvtkit.data")}
    assert {k: v for k, v in offenders.items() if v} == {}


def _oversized_here() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{path.relative_to(PACKAGE)}: over {MAX_FILE_LINES} lines")
        found += [f"{path.relative_to(PACKAGE)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                  for node in ast.walk(ast.parse(text))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    return found


def test_modules_and_functions_stay_readable():
    out = subprocess.run([sys.executable, __file__, "--oversized"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


if __name__ == "__main__":
    print(json.dumps(_oversized_here() if "--oversized" in sys.argv else _graph_here()))
