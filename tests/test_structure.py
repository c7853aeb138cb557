"""The package's structure rules, checked statically over the source of `pipeline/` and `data_prep/`.

- no import cycle among the package's own modules, counting every import statement (also those inside functions);
- `pipeline.train.train`, the training loop, stays under 50 lines;
- no function or method is over 60 lines, argument-parser definitions excepted;
- every module imports on its own.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "data_prep")
MAX_FUNCTION_LINES = 60
MAX_TRAIN_LINES = 50  # exclusive: the loop must be under 50 lines
PARSER_FUNCTIONS = {"register", "build_parser"}


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages; `pkg/__init__.py` is the module `pkg`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _known(name: str) -> str | None:
    """The longest prefix of dotted `name` that is one of the package's modules, or None if outside them."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules():
            return candidate
    return None


def imported_modules(name: str) -> set[str]:
    """The package modules that module `name` imports, from every import statement anywhere in it."""
    targets = set()
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree(modules()[name])):
        if isinstance(node, ast.Import):
            targets.update(_known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pipeline import x` is the module pipeline.x when there is one, else a name of `pipeline`
                targets.add(_known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules() else _known(base))
    targets.discard(None)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name) for name in modules()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None if the graph is acyclic."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == grey:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == white and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white and (cycle := visit(node)):
            return cycle
    return None


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree(path)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def length(fn: ast.AST) -> int:
    """Lines from the `def` line to the function's last line, inclusive (decorators not counted)."""
    return fn.end_lineno - fn.lineno + 1


def _calls_add_argument(stmt: ast.stmt) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"
               for n in ast.walk(stmt))


def _simple_statements(fn: ast.AST) -> list[ast.stmt]:
    """Statements of the function that hold no other statements (the body of ifs and loops, flattened)."""
    out = []
    for n in ast.walk(fn):
        if n is fn or not isinstance(n, ast.stmt):
            continue
        if not any(isinstance(c, ast.stmt) for c in ast.iter_child_nodes(n)):
            out.append(n)
    return out


def mostly_add_argument(fn: ast.AST) -> bool:
    """Whether more than half the function's lines are taken by statements that call `add_argument`."""
    lines = set()
    for stmt in _simple_statements(fn):
        if _calls_add_argument(stmt):
            lines.update(range(stmt.lineno, stmt.end_lineno + 1))
    return len(lines) * 2 > length(fn)


def is_parser_definition(path: Path, fn: ast.AST) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    in_cli = rel == "pipeline/cli.py" or rel.startswith("pipeline/commands/")
    return (in_cli and fn.name in PARSER_FUNCTIONS) or mostly_add_argument(fn)


# --- the rule checkers themselves, on small sources, so that a checker that sees nothing cannot pass -------------


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_imports_inside_functions_and_resolves_from_imports():
    graph = import_graph()
    # pipeline/evaluate.py: `from pipeline import data` at the top, `from pipeline import convert` inside a function,
    # `from pipeline.config import Spec` -> the module pipeline.config
    expected = {"pipeline.data", "pipeline.convert", "pipeline.config", "pipeline.dataset_json"}
    assert expected <= graph["pipeline.evaluate"]
    # `from pipeline.model import VARIANTS` inside config.validate
    assert "pipeline.model" in graph["pipeline.config"]
    assert all(target in modules() for targets in graph.values() for target in targets)


def test_the_length_rule_exempts_argument_parsers_only():
    src = "def f(p):\n" + "    p.add_argument('--x',\n        help='y')\n" * 40 + "    return p\n"
    fn = ast.parse(src).body[0]
    assert length(fn) == 82 and mostly_add_argument(fn)
    src = "def g(p):\n" + "    x = 1\n" * 40 + "    p.add_argument('--x')\n" * 10
    assert not mostly_add_argument(ast.parse(src).body[0])


# --- the rules -------------------------------------------------------------------------------------------------------


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert len(graph) >= 20, sorted(graph)  # the walk found the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_training_loop_is_under_50_lines():
    path = modules()["pipeline.train"]
    (train,) = [fn for fn in tree(path).body if isinstance(fn, ast.FunctionDef) and fn.name == "train"]
    assert length(train) < MAX_TRAIN_LINES, f"pipeline/train.py:{train.lineno} train() is {length(train)} lines"


def test_no_function_is_over_60_lines_except_argument_parsers():
    offenders = []
    checked = 0
    for path in modules().values():
        for fn in functions(path):
            checked += 1
            if length(fn) > MAX_FUNCTION_LINES and not is_parser_definition(path, fn):
                offenders.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}() is {length(fn)} lines")
    assert checked > 100, checked
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(sorted(offenders))


# Each module is imported with every module of the packages first dropped from sys.modules, so that it imports its
# own dependencies as it would in a fresh interpreter (third-party modules stay loaded: the run stays quick).
IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("pipeline", "data_prep")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, *sorted(modules())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"modules that fail to import:\n{proc.stdout}\n{proc.stderr[-3000:]}"
