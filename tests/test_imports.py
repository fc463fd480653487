"""The house's imports: every module imports, every advertised name resolves (lazy exports included), the public
API comes from the top-level package without loading torch, no import cycle, few function-local imports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import headscore

SOURCE = Path(headscore.__file__).parent
MODULES = ["headscore", *sorted(m.name for m in pkgutil.walk_packages(headscore.__path__, "headscore.")
                                if not m.name.endswith("__main__"))]  # __main__ runs the command line
PACKAGES = ["headscore", *(m.name for m in pkgutil.walk_packages(headscore.__path__, "headscore.") if m.ispkg)]
MAX_LOCAL_IMPORTS = 10  # function-local `headscore` imports outside cli/, each with its reason


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_resolves(name):
    module = importlib.import_module(name)
    missing = [item for item in getattr(module, "__all__", ()) if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names {missing}, which do not resolve"


@pytest.mark.parametrize("name", PACKAGES)
def test_star_import(name):
    namespace: dict = {}
    exec(f"from {name} import *", namespace)
    assert set(getattr(importlib.import_module(name), "__all__", ())) <= set(namespace)


def test_public_api_from_the_top_level():
    from headscore import (  # noqa: F401
        SCORERS,
        TASKS,
        Budgets,
        HeadwiseCache,
        allocate,
        compress_generate,
        estimate,
        evaluate,
        load_model,
        make_press,
        read_budgets,
        read_head_scores,
        register_scorer,
        register_task,
    )
    from headscore.compression.allocation import allocate as defined

    assert allocate is defined and "snapkv" in SCORERS and "niah" in TASKS
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        headscore.nonexistent  # noqa: B018


def test_importing_headscore_loads_no_torch():
    """`import headscore` and the CLI's modules stay light (`headscore --help` answers without torch)."""
    code = ("import sys, headscore, headscore.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """The import statements that run when the module is imported (TYPE_CHECKING blocks excluded)."""
    found: list[ast.stmt] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending.extend([*node.body, *node.orelse])
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody,
                            *(s for handler in node.handlers for s in handler.body)])
    return found


def import_graph(local: bool = False) -> dict[str, set[str]]:
    """Module -> the headscore modules its module-level imports load (a `from package import module` names the
    module); `local`: its function-local imports too."""
    modules = {module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        statements = ([node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))] if local
                      else module_level_imports(tree))
        for node in statements:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
            elif node.module in modules:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets.update(submodules or {node.module})
                if len(submodules) < len(node.names):
                    targets.add(node.module)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("local", [False, True], ids=["module-level", "function-local-included"])
def test_no_import_cycle(local):
    """No cycle among module-level imports, nor one hidden in a function-local import (as `core.assets` <->
    `core.model` was)."""
    graph = import_graph(local)
    assert graph["headscore.core.model"] >= {"headscore.core.assets", "headscore.core.families"}  # the walk sees
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_function_local_imports_are_few_and_explained():
    """A `headscore` import inside a function hides a dependency from readers and tools: outside the CLI (whose
    commands import the library when run, for a fast --help) at most MAX_LOCAL_IMPORTS, each with a comment
    on its line or the line above giving the reason."""
    local: list[str] = []
    unexplained: list[str] = []
    for path in sorted(SOURCE.rglob("*.py")):
        if "cli" in path.relative_to(SOURCE).parts:
            continue
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(name.split(".")[0] == "headscore" for name in names):
                    where = f"{path.relative_to(SOURCE)}:{node.lineno}"
                    local.append(where)
                    if "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                        unexplained.append(where)
    assert len(set(local)) <= MAX_LOCAL_IMPORTS, f"{len(local)} function-local headscore imports: {local}"
    assert not unexplained, f"function-local headscore imports without a reason: {unexplained}"
