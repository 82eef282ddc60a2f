"""The flows/ modules import each other in one direction: no loop, not even one hidden inside a function.

A loop between flows modules worked only while the import that closed it sat inside a function
(``flows/domains.py`` importing ``flows/training.py`` at call time); these tests fail if one
comes back.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
MODULES = sorted(f"flows.{path.stem}" for path in (ROOT / "flows").glob("*.py") if path.stem != "__init__")


def flows_imports(module: str) -> set[str]:
    """The flows modules ``module`` imports, at the top or inside a function."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name in MODULES and name != module}


def test_the_flows_import_graph_has_no_loop():
    graph = {module: flows_imports(module) for module in MODULES}
    visiting, done = [], set()

    def visit(module: str) -> None:
        if module in visiting:
            loop = visiting[visiting.index(module) :] + [module]
            raise AssertionError(f"import loop between flows modules: {' -> '.join(loop)}")
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


# Run in one interpreter: the project's modules are dropped from sys.modules before each import,
# so each flows module is the first project module imported, while torch, Prefect and MLflow load once.
IMPORT_EACH_FIRST = """
import importlib, sys, traceback
failed = {}
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n.split(".")[0] in ("flows", "tasks", "models")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception as error:
        failed[module] = f"{type(error).__name__}: {error}"
print(failed)
"""


def test_every_flows_module_imports_first():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, *MODULES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "{}", f"modules that fail to import first: {result.stdout}"
    assert {"flows.domains", "flows.inner_loop", "flows.knowledge", "flows.training"} <= set(MODULES)
