"""dvc.yaml's code dependencies against the code each stage really runs.

A stage's command is `etpo <subcommand>`; what it runs is pipeline/cli.py (and what cli.py imports
at module level), the subcommand's function and every module of `pipeline/` those import,
transitively (imports inside functions included). Each of those files must be covered by a dep
of the stage (the file itself or a folder above it), or a code change would leave DVC's cache
stale; and each `pipeline/` dep must cover something the stage runs, or it reruns for nothing.
`etpo` runs `pipeline/__main__.py` and `allocator.py` first: they pick the malloc, which changes
speed, not outputs, so they are not deps (a change there reruns nothing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"


def module_file(name: str) -> Path | None:
    """The file of module `pipeline.a.b` (a .py file or a package's __init__.py), if any."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(nodes: list[ast.stmt] | ast.AST) -> set[str]:
    """Modules of `pipeline` imported anywhere in `nodes` (`from pkg import mod` names mod)."""
    found = set()
    for node in ast.walk(nodes) if isinstance(nodes, ast.AST) else (n for s in nodes for n in ast.walk(s)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def runs_code(path: Path) -> bool:
    """False for a file that holds only a docstring (a package's __init__.py): it changes nothing."""
    body = ast.parse(path.read_text()).body
    return not (len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body))


def closure(modules: set[str]) -> set[Path]:
    """The files of `modules`, their parent packages, and everything they import, transitively
    (less the docstring-only ones)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += imports_of(ast.parse(path.read_text()))
    return {path for path in seen if runs_code(path)}


def cli_commands() -> dict[str, ast.FunctionDef]:
    """Subcommand name -> its function in pipeline/cli.py."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    commands = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "command":
                name = deco.args[0].value if deco.args else node.name.replace("_", "-")
                commands[name] = node
    return commands


def stage_code(subcommand: str) -> set[Path]:
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top_level = imports_of([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)])
    return {PACKAGE / "cli.py"} | closure(top_level | imports_of(cli_commands()[subcommand]))


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(path: Path, dep: str) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return relative == dep or relative.startswith(dep.rstrip("/") + "/")


@pytest.mark.parametrize("name", list(stages()))
def test_code_deps_cover_what_the_stage_runs_and_nothing_else(name):
    stage = stages()[name]
    stage = stage.get("do", stage)
    subcommand = stage["cmd"].split()[1]
    code = stage_code(subcommand)
    deps = [d for d in stage["deps"] if d.startswith("pipeline")]
    missing = sorted(p.relative_to(REPO).as_posix() for p in code if not any(covered(p, d) for d in deps))
    assert not missing, f"{name}: add to its deps: {missing}"
    unused = [d for d in deps if not any(covered(p, d) for p in code)]
    assert not unused, f"{name}: deps it does not run: {unused}"


def test_the_checker_sees_lazy_and_transitive_imports():
    """The closure follows imports inside functions (cli's per-command imports, config's late
    import of the datasets module) and through packages."""
    code = {p.relative_to(REPO).as_posix() for p in stage_code("train")}
    assert {"pipeline/stages/train.py", "pipeline/etpo/train.py", "pipeline/models/update.py"} <= code
    assert "pipeline/tasks/datasets.py" in code  # config.py imports it inside a function
    assert "pipeline/__init__.py" in code and "pipeline/models/__init__.py" not in code  # docstring only
    assert "pipeline/stages/report.py" not in code
