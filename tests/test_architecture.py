"""The package's shape: stages as subpackages, no import cycle, the job runner standalone."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bpcp"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """bpcp modules a module imports, anywhere in it (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bpcp"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n in known}


def test_no_import_cycle():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    # packages import nothing but may be imported: drop "pkg -> pkg.module" edges through __init__
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_stages_are_subpackages():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {"inputs", "jobs", "results", "sizing", "aws"} <= stages


def test_runner_needs_only_the_standard_library_and_python_39():
    runner = PACKAGE / "jobs" / "runner.py"
    tree = ast.parse(runner.read_text(), feature_version=(3, 9))
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top - set(sys.stdlib_module_names)
    # it runs as a plain file, outside the package, with no bpcp importable
    proc = subprocess.run([sys.executable, "-I", str(runner), "--help"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and "run" in proc.stdout, proc.stderr


def test_one_place_builds_the_cellprofiler_command():
    """Only the runner spells CellProfiler's headless flags; everything else calls it."""
    for name, path in modules().items():
        if name == "bpcp.jobs.runner":
            continue
        text = path.read_text()
        assert '"-c", "-r", "-p"' not in text and "imageio_reader" not in text, name
        assert "OMP_NUM_THREADS" not in text, name
