"""The dependency rules of ARCHITECTURE.md §2, enforced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "calibrators", "engines", "service")
TENSORRT_DOORS = {"core/tensorrt.py", "engines/backends/tensorrt.py"}
GPU_DOORS = TENSORRT_DOORS | {"core/cuda.py", "engines/gpu.py"}
GPU_LIBS = ("tensorrt", "cuda", "pynvml")


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported module, imported at module level?) for every import in the tree."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, not in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, not in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_import_linter_contracts_hold() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: " in result.stdout and " broken" not in result.stdout.replace("0 broken", "")


def test_gpu_libraries_only_behind_their_doors_and_inside_functions() -> None:
    offenders = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        for module, top_level in _imports(ast.parse(path.read_text(), rel)):
            root = module.split(".")[0]
            if root not in GPU_LIBS:
                continue
            allowed = TENSORRT_DOORS if root == "tensorrt" else GPU_DOORS
            if rel not in allowed:
                offenders.append(f"{rel} imports {module} (only {sorted(allowed)} may)")
            elif top_level:
                offenders.append(
                    f"{rel} imports {module} at module level (import it inside the function)"
                )
    assert not offenders, "\n".join(offenders)


def test_every_module_imports_without_gpu_libraries() -> None:
    # Alembic runs the migration scripts itself (they need alembic.context); everything else imports.
    modules = [p for p in _modules() if "migrations" not in p.parts]
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in modules]
    names = [n.removesuffix(".__init__") for n in names]
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {GPU_LIBS!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        # cuda-bindings' .pth file imports the bare `cuda` namespace at startup: not our doing
        "before = set(sys.modules)\n"
        "import importlib\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        f"leaked = [m for m in set(sys.modules) - before if m.split('.')[0] in {GPU_LIBS!r}]\n"
        "assert not leaked, leaked\n"
        "print('imported', len(" + repr(names) + "))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(names)}" in result.stdout


def test_numba_only_behind_calibrators_kernels() -> None:
    # numba costs 0.3 s and ~100 MB per process: only processes that compute statistics load it
    offenders = [
        rel
        for path in _modules()
        if (rel := path.relative_to(ROOT).as_posix()) != "calibrators/kernels.py"
        and any(m.split(".")[0] == "numba" for m, _ in _imports(ast.parse(path.read_text(), rel)))
    ]
    assert not offenders, offenders
    script = (
        "import sys\n"
        "import service.api.app, service.cli.options, calibrators.histogram, calibrators.calibrate, engines.build\n"
        "assert 'numba' not in sys.modules, 'numba imported'\n"
        "from calibrators.histogram import HistogramCollector\n"
        "HistogramCollector().observe('t', [1.0, -2.0])\n"
        "assert 'numba' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_in_any_package_bench_included() -> None:
    # Imports under TYPE_CHECKING and inside functions count too: a cycle is a cycle of design.
    graph = grimp.build_graph(*PACKAGES, "bench", cache_dir=None)
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "loopy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from loopy import b\n")
    (package / "b.py").write_text("from loopy import c\n")
    (package / "c.py").write_text("import loopy.a\n")
    (package / "d.py").write_text("import loopy.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("loopy", cache_dir=None)) == [
        ["loopy.a", "loopy.b", "loopy.c"]
    ]


def test_the_thin_http_client_loads_no_numpy_onnx_or_server_libraries() -> None:
    # `python -X importtime` lists every module the import loads, at any depth
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import service.client"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "service.client" in loaded and "engines.spec" in loaded  # the listing is real
    heavy = ("numpy", "onnx", "onnxruntime", "PIL", "sqlalchemy", "fastapi", "starlette", "numba")
    pulled = sorted(m for m in loaded if m.split(".")[0] in heavy)
    assert not pulled, pulled


# Where a backend's name may be written: the names, the registry and each backend's own adapter.
BACKEND_NAME_HOMES = {
    "engines/names.py",
    "engines/backends/registry.py",
    "engines/backends/onnxruntime.py",
    "engines/backends/tensorrt.py",
    "engines/backends/tensorrt_runner.py",
}
_MODULE_LOOKUPS = {"find_spec", "import_module"}  # "onnxruntime" there names a Python module


def _backend_names_written(tree: ast.AST) -> list[int]:
    """Lines of string constants that are a backend's name (module lookups aside)."""
    names = {"tensorrt", "onnxruntime"}
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in _MODULE_LOOKUPS:
                skip.update(id(arg) for arg in node.args)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in skip
    ]


def test_backend_names_are_written_only_in_the_registry_and_the_adapters() -> None:
    # A new backend is one module plus one registry line: nothing else compares or lists names.
    found = []
    for path in sorted(p for pkg in ("engines", "service") for p in (ROOT / pkg).rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in BACKEND_NAME_HOMES or path.name.endswith(".min.js"):
            continue
        if path.suffix == ".py":
            found += [f"{rel}:{line}" for line in _backend_names_written(ast.parse(path.read_text()))]
        elif path.suffix in (".html", ".js", ".tmpl"):
            text = path.read_text()
            found += [rel for name in ("tensorrt", "onnxruntime") if f'"{name}"' in text]
    assert not found, found


def test_the_backend_name_finder_finds_a_written_name() -> None:
    tree = ast.parse('import importlib\nimportlib.util.find_spec("onnxruntime")\nif b == "tensorrt": pass\n')
    assert _backend_names_written(tree) == [3]
