"""The runtime must import without torch, transformers or optimum: users deploy it without them.
And the package must stay a tree a reader can follow: no import cycles, lazy imports included."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import ragrt

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum", "sentence_transformers", "accelerate", "onnx", "ray")
PACKAGE = Path(ragrt.__file__).parent


def runtime_modules() -> list[str]:
    """Every module of the installed runtime package, the build side (ragrt.export) left out."""
    names = ["ragrt"]
    for info in pkgutil.walk_packages(ragrt.__path__, "ragrt."):
        if not info.name.startswith("ragrt.export") and info.name != "ragrt.__main__":
            names.append(info.name)
    return names


def test_runtime_imports_no_torch_side_module():
    modules = [m for m in runtime_modules() if not m.startswith("ragrt.serve")]
    code = (f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert len(modules) > 20
    assert out.stdout.strip() == "", f"the runtime imported {out.stdout.strip()}"


def test_the_check_would_notice_torch():
    code = f"import sys, torch\nprint(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "torch" in out.stdout


def test_tests_use_the_installed_package_not_a_checkout_module():
    """Nothing named engine or export is importable here: one package, ragrt, the installed one."""
    import importlib.util
    assert importlib.util.find_spec("engine") is None and importlib.util.find_spec("export") is None
    assert str(ROOT) not in [str(Path(p).resolve()) for p in sys.path if p]


def _module_of(path: Path, base: Path, prefix: str) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts])


def import_graph(package_dir: Path, prefix: str) -> dict[str, set[str]]:
    """module -> the ragrt modules it imports anywhere in its body (functions included)."""
    files = {_module_of(p, package_dir, prefix): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_runtime():
    graph = import_graph(PACKAGE, "ragrt")
    graph = {m: deps for m, deps in graph.items() if not m.startswith("ragrt.export")}
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (tmp_path / "b.py").write_text("from pkg.a import f\n")
    (tmp_path / "c.py").write_text("from pkg import a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_pickle_anywhere():
    """Bundles and checkpoints are ONNX, safetensors, JSON and raw arrays: nothing that runs code on load."""
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")) + sorted((ROOT / "export").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.replace("allow_pickle=False", "")
            if any(word in code for word in ("pickle", "torch.load(", "joblib", "dill")):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
