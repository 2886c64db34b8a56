"""The layers call downwards only: no import circle among the project's modules, and the library (models/,
datasets/, util/) never imports the command line, the training loop, the API or the tools. Read from the
source (every import statement, in functions too), so a lazy import cannot hide a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "datasets", "util")
APPLICATION = ("main", "runner", "epochs", "evaluation", "engine", "inference", "model_config", "hubconf", "tools")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    files = [p for p in root.rglob("*.py")
             if not {".venv", "tests", "build", ".git", "outputs"} & set(p.relative_to(root).parts)]
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (relative imports resolved; ``from pkg import sub`` counts as
    importing ``pkg.sub`` when that is a module)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".") if package else []
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in modules] or [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_circle():
    assert find_cycles(import_graph(project_modules())) == []


def test_the_library_never_imports_the_application():
    graph = import_graph(project_modules())
    upward = sorted((module, target) for module, targets in graph.items() if module.split(".")[0] in LIBRARY
                    for target in targets if target.split(".")[0] in APPLICATION)
    assert upward == []


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The two tests above would pass on any tree if the graph missed imports: plant both kinds."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "models" / "b.py").write_text("from models.a import f\nimport main\n")
    (tmp_path / "main.py").write_text("")
    graph = import_graph(project_modules(tmp_path))
    assert find_cycles(graph) == [["models.a", "models.b", "models.a"]]
    assert "main" in graph["models.b"]
