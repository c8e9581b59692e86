"""TensorRT's real API surface, read from the bindings wheels, and the TensorRT names trtforge uses.

No machine here has TensorRT's native libraries, so ``import tensorrt`` cannot work; but the
bindings wheels (``tensorrt-cu12-bindings`` 10.x, ``tensorrt-cu13-bindings`` 11.x) install from
PyPI and hold the extension module. pybind11 registers every class, method, property and enum
value by a C string literal, so the names a ``tensorrt.so`` exports are in its bytes, each one
followed by a NUL. The linker shares string tails (``"INPUT"`` may be stored as the end of
``"LAYER_INPUT"``), so a name exists when ``name + b"\\0"`` occurs anywhere in the file.

The other side is static: :func:`collect_uses` parses a module with :mod:`ast` and lists every
``trt.X.Y`` attribute chain (rooted at the name ``import tensorrt`` binds) and every attribute
read or called on a TensorRT object. Objects are tracked from where they come from: a constructor
(``trt.Builder(...)``), a factory method with a known return class (:data:`RETURNS`), or a
parameter whose name says what it holds (:data:`PARAMETER_CLASSES`: the door modules' helpers take
``builder``, ``config``, ``network``... typed ``Any``). Each use records the enclosing functions,
so implicit-only uses (functions named ``*implicit*``, or the native calibrator module) can be
left out of the TensorRT 11 check (so are the native calibrators: ``native_calibrator``).

Fetch the wheels (CI does this once; needs pip and network):

    python -m tests.trt_surface fetch --dest .cache/trt-bindings

then point the tests at them with ``TRTFORGE_TRT10_SO`` / ``TRTFORGE_TRT11_SO`` (the command
prints the lines to export).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PARAMETER_CLASSES",
    "RETURNS",
    "WHEELS",
    "Bindings",
    "StubIndex",
    "Use",
    "bindings_path",
    "collect_uses",
    "fetch",
    "missing_in_bindings",
    "missing_in_stubs",
    "require_bindings",
    "require_stubs",
]

WHEELS = {10: "tensorrt-cu12-bindings==10.*", 11: "tensorrt-cu13-bindings==11.*"}
ENV_VARS = {10: "TRTFORGE_TRT10_SO", 11: "TRTFORGE_TRT11_SO"}
DEFAULT_DEST = Path.home() / ".cache" / "trtforge" / "trt-bindings"
_SO = Path("tensorrt_bindings") / "tensorrt.so"

PARAMETER_CLASSES = {
    "builder": "Builder",
    "config": "IBuilderConfig",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "profile": "IOptimizationProfile",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "runtime": "Runtime",
    "inspector": "EngineInspector",
    "layer": "ILayer",
    "error": "ParserError",
    "serialized": "IHostMemory",
    "logger": "ILogger",
}
"""Parameters (and ``self._<name>`` attributes) of these names hold these TensorRT classes."""

RETURNS = {
    ("Builder", "create_network"): "INetworkDefinition",
    ("Builder", "create_builder_config"): "IBuilderConfig",
    ("Builder", "create_optimization_profile"): "IOptimizationProfile",
    ("Builder", "build_serialized_network"): "IHostMemory",
    ("IBuilderConfig", "create_timing_cache"): "ITimingCache",
    ("IBuilderConfig", "get_timing_cache"): "ITimingCache",
    ("INetworkDefinition", "get_layer"): "ILayer",
    ("INetworkDefinition", "get_input"): "ITensor",
    ("INetworkDefinition", "get_output"): "ITensor",
    ("ILayer", "get_output"): "ITensor",
    ("ILayer", "get_input"): "ITensor",
    ("OnnxParser", "get_error"): "ParserError",
    ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
    ("ICudaEngine", "create_execution_context"): "IExecutionContext",
    ("ICudaEngine", "create_engine_inspector"): "EngineInspector",
    ("ITimingCache", "serialize"): "IHostMemory",
}
"""What TensorRT factory methods return, to follow objects through assignments."""

_NOT_OBJECTS = {"get_engine_information", "get_tensor_name", "get_tensor_shape"}


# -- the bindings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bindings:
    """The names one ``tensorrt.so`` (plus its package ``__init__.py``) exports."""

    path: Path
    data: bytes
    python_names: frozenset[str]

    @classmethod
    def load(cls, so_path: Path) -> Bindings:
        init = so_path.with_name("__init__.py")
        names: set[str] = set()
        if init.exists():
            for node in ast.walk(ast.parse(init.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            names.add(target.id)
                        elif isinstance(target, ast.Attribute):
                            names.add(target.attr)
        return cls(so_path, so_path.read_bytes(), frozenset(names))

    def has(self, name: str) -> bool:
        """Whether the module exports ``name`` (see the module docstring for why this works)."""
        return name in self.python_names or (name.encode() + b"\0") in self.data


def bindings_path(major: int) -> Path | None:
    """Where the ``tensorrt.so`` of TensorRT ``major`` is: ``$TRTFORGE_TRT<major>_SO``, else the
    default fetch folder, else ``/tmp/trt<major>`` (this project's dev machines)."""
    env = os.environ.get(ENV_VARS[major])
    if env:
        return Path(env)
    for candidate in (DEFAULT_DEST / f"trt{major}" / _SO, Path(f"/tmp/trt{major}") / _SO):
        if candidate.is_file():
            return candidate
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_bindings(major: int) -> Bindings:
    """The bindings of TensorRT ``major`` for a test: skipped when absent, but failed in CI."""
    import pytest

    path = bindings_path(major)
    if path is None or not path.is_file():
        message = (
            f"The TensorRT {major}.x bindings ({WHEELS[major]}) are not here: run "
            f"`python -m tests.trt_surface fetch` and set {ENV_VARS[major]} "
            f"(looked at {path or DEFAULT_DEST / f'trt{major}' / _SO})."
        )
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return Bindings.load(path)


def require_stubs() -> StubIndex:
    """The ``tensorrt-stubs`` index (dev extra): skipped when absent, but failed in CI."""
    import pytest

    for folder in map(Path, sys.path):
        candidate = folder / "tensorrt_bindings"
        if (candidate / "tensorrt.pyi").is_file():
            return StubIndex.load(candidate)
    if _in_ci():
        pytest.fail("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    pytest.skip("tensorrt-stubs is not installed")


def fetch(dest: Path) -> dict[int, Path]:
    """Download both bindings wheels with pip (no dependencies) and unpack them under ``dest``."""
    dest = Path(dest).resolve()
    paths: dict[int, Path] = {}
    for major, requirement in WHEELS.items():
        wheels = dest / "wheels" / f"trt{major}"
        wheels.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        subprocess.run([*pip, "--dest", str(wheels), requirement], check=True)
        (wheel,) = sorted(wheels.glob("*.whl"))[-1:]
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith("tensorrt_bindings/")]
            archive.extractall(dest / f"trt{major}", members=members)
        paths[major] = dest / f"trt{major}" / _SO
    return paths


# -- the stubs (tensorrt-stubs, a 10.x release): per-class membership ------------------------------


@dataclass
class StubIndex:
    """Classes of the ``tensorrt-stubs`` package: their members (inherited included)."""

    members: dict[str, set[str]]
    bases: dict[str, list[str]]
    module_names: set[str]

    @classmethod
    def load(cls, stub_dir: Path) -> StubIndex:
        # The generated .pyi is not always valid Python (defaults before non-defaults), so it is
        # read line by line: classes at column 0, members at 4 spaces.
        members: dict[str, set[str]] = {}
        bases: dict[str, list[str]] = {}
        module_names: set[str] = set()
        current: str | None = None
        for path in (stub_dir / "tensorrt.pyi", stub_dir / "__init__.pyi"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if m := re.match(r"class (\w+)(?:\((.*)\))?:", line):
                    current = m.group(1)
                    members.setdefault(current, set())
                    bases[current] = [
                        b.strip().split(".")[-1] for b in (m.group(2) or "").split(",")
                    ]
                    module_names.add(current)
                elif m := re.match(r"(?:def (\w+)\(|(\w+)\s*[:=])", line):
                    current = None
                    module_names.add(m.group(1) or m.group(2))
                elif current and (m := re.match(r"    (?:def (\w+)\(|(\w+)\s*:)", line)):
                    members[current].add(m.group(1) or m.group(2))
        return cls(members, bases, module_names)

    def has_member(self, cls_name: str, member: str) -> bool:
        seen: set[str] = set()
        todo = [cls_name]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.members:
                continue
            seen.add(name)
            if member in self.members[name]:
                return True
            todo.extend(self.bases.get(name, []))
        return False


# -- the code: what trtforge uses -----------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    """One TensorRT name used in a module.

    ``kind`` is ``"module"`` for an attribute chain on the module (``names`` = the chain after
    ``trt``), ``"member"`` for an attribute of a TensorRT object (``owner`` = its class), or
    ``"override"`` for a method a Python subclass of a TensorRT class defines.
    """

    kind: str
    names: tuple[str, ...]
    owner: str | None
    line: int
    functions: tuple[str, ...]
    file: str

    @property
    def implicit_only(self) -> bool:
        return any("implicit" in f or f == "native_calibrator" for f in self.functions)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.kind == "module":
            return f"trt.{'.'.join(self.names)} ({where})"
        return f"{self.owner}.{self.names[0]} ({self.kind}, {where})"


@dataclass
class _Scope:
    objects: dict[str, str] = field(default_factory=dict)
    """Variable (or ``self.x``) -> TensorRT class it holds."""
    lists: dict[str, str] = field(default_factory=dict)
    """Variable -> TensorRT class of its elements."""


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """``a.b.c`` -> ("a", ["b", "c"])."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and parts:
        return node.id, parts[::-1]
    return None


class _Collector:
    def __init__(self, tree: ast.Module, file: str) -> None:
        self.file = file
        self.aliases = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
            if a.name == "tensorrt"
        } | {  # trt = tensorrt_module(): the module handed out by calibrators/tensorrt.py
            t.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Name)
            and n.value.func.id == "tensorrt_module"
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        self.uses: list[Use] = []
        self.unknown_returns: list[str] = []
        self.tree = tree

    def run(self) -> list[Use]:
        self._body(self.tree.body, (), _Scope())
        return self.uses

    def _body(self, body: list[ast.stmt], functions: tuple[str, ...], scope: _Scope) -> None:
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = _Scope(dict(scope.objects), dict(scope.lists))
                for arg in [*stmt.args.posonlyargs, *stmt.args.args, *stmt.args.kwonlyargs]:
                    if arg.arg in PARAMETER_CLASSES:
                        inner.objects[arg.arg] = PARAMETER_CLASSES[arg.arg]
                self._body(stmt.body, (*functions, stmt.name), inner)
            elif isinstance(stmt, ast.ClassDef):
                self._class(stmt, functions, scope)
            else:
                self._statement(stmt, functions, scope)

    def _class(self, node: ast.ClassDef, functions: tuple[str, ...], scope: _Scope) -> None:
        module_classes = {n.name for n in self.tree.body if isinstance(n, ast.ClassDef)}
        own_classes = {  # imported from trtforge's own packages (e.g. BaseRunner)
            a.asname or a.name
            for n in self.tree.body
            if isinstance(n, ast.ImportFrom)
            and (n.module or "").split(".")[0] in ("core", "calibrators", "engines")
            for a in n.names
        }
        plain = {"object", "BaseModel", "Protocol", "Exception", *module_classes, *own_classes}
        dynamic = [b for b in node.bases if _dotted(b) not in plain]
        for stmt in node.body:
            public = isinstance(stmt, ast.FunctionDef) and not stmt.name.startswith("_")
            if dynamic and public and stmt.name != "close":  # close() is trtforge's own
                self._add("override", (stmt.name,), "IInt8Calibrator", stmt, functions)
        self._body(node.body, (*functions, node.name), _Scope(dict(scope.objects)))

    def _statement(self, stmt: ast.stmt, functions: tuple[str, ...], scope: _Scope) -> None:
        """Bind what the statement assigns, scan its own expressions, recurse into its blocks."""
        if isinstance(stmt, ast.Assign | ast.AnnAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                self._bind(target, stmt.value, scope)
        elif isinstance(stmt, ast.For | ast.AsyncFor):
            self._bind_loop(stmt.target, stmt.iter, scope)
        for _, value in ast.iter_fields(stmt):
            items = value if isinstance(value, list) else [value]
            if items and isinstance(items[0], ast.stmt):
                self._body(items, functions, scope)
                continue
            for item in items:
                if isinstance(item, ast.ExceptHandler | ast.match_case):
                    self._body(item.body, functions, scope)
                elif isinstance(item, ast.AST):
                    self._scan(item, functions, scope)

    def _scan(self, expr: ast.AST, functions: tuple[str, ...], scope: _Scope) -> None:
        for node in ast.walk(expr):
            if isinstance(node, ast.comprehension):
                self._bind_loop(node.target, node.iter, scope)
        for node in ast.walk(expr):
            if isinstance(node, ast.Attribute):
                self._attribute(node, functions, scope)

    def _class_of(self, node: ast.AST | None, scope: _Scope) -> str | None:
        """The TensorRT class an expression evaluates to, when the collector can tell."""
        if node is None:
            return None
        key = _dotted(node)
        if key is not None and key in scope.objects:
            return scope.objects[key]
        if key is not None and key.startswith("self."):  # self._engine, self._context, ...
            return PARAMETER_CLASSES.get(key.removeprefix("self.").lstrip("_"))
        if isinstance(node, ast.Call):
            chain = _chain(node.func)
            if (
                chain
                and chain[0] in self.aliases
                and len(chain[1]) == 1
                and chain[1][0][:1].isupper()
            ):
                return chain[1][0]  # trt.Builder(logger)
            if isinstance(node.func, ast.Attribute):
                owner = self._class_of(node.func.value, scope)
                if owner is not None:
                    method = node.func.attr
                    returned = RETURNS.get((owner, method))
                    factory = method.startswith(("create_", "deserialize_", "get_"))
                    if returned is None and factory and method not in _NOT_OBJECTS:
                        self.unknown_returns.append(f"{owner}.{method} ({self.file}:{node.lineno})")
                    return returned
        return None

    def _bind(self, target: ast.AST, value: ast.AST | None, scope: _Scope) -> None:
        key = _dotted(target)
        if key is None:
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                for t, v in zip(target.elts, value.elts, strict=False):
                    self._bind(t, v, scope)
            return
        if isinstance(value, ast.ListComp):
            element = self._class_of(value.elt, scope)
            if element is not None:
                scope.lists[key] = element
                return
        owner = self._class_of(value, scope)
        if owner is not None:
            scope.objects[key] = owner

    def _bind_loop(self, target: ast.AST, iterable: ast.AST, scope: _Scope) -> None:
        key, source = _dotted(target), _dotted(iterable)
        if key is not None and source is not None and source in scope.lists:
            scope.objects[key] = scope.lists[source]

    def _attribute(self, node: ast.Attribute, functions: tuple[str, ...], scope: _Scope) -> None:
        chain = _chain(node)
        if chain and chain[0] in self.aliases:
            names = chain[1]
            dunder = next((i for i, n in enumerate(names) if n.startswith("__")), None)
            if dunder is not None:  # trt.__version__.split: beyond it is a plain Python object
                names = names[: dunder + 1]
            self._add("module", tuple(names), None, node, functions)
            return
        owner = self._class_of(node.value, scope)
        if owner is not None:
            self._add("member", (node.attr,), owner, node, functions)

    def _add(
        self,
        kind: str,
        names: tuple[str, ...],
        owner: str | None,
        node: ast.AST,
        functions: tuple[str, ...],
    ) -> None:
        line = getattr(node, "lineno", 0)
        use = Use(kind, names, owner, line, functions, self.file)
        if use not in self.uses:
            self.uses.append(use)


def collect_uses(source: str, file: str) -> tuple[list[Use], list[str]]:
    """Every TensorRT name ``source`` uses, and the factory calls whose result class is unknown."""
    collector = _Collector(ast.parse(source), file)
    uses = collector.run()
    # module chains are recorded at every prefix depth; keep the longest per location
    longest = [u for u in uses if not _is_prefix_of_another(u, uses)]
    return longest, sorted(set(collector.unknown_returns))


def _is_prefix_of_another(use: Use, uses: list[Use]) -> bool:
    if use.kind != "module":
        return False
    return any(
        o.kind == "module"
        and o.line == use.line
        and len(o.names) > len(use.names)
        and o.names[: len(use.names)] == use.names
        for o in uses
    )


def missing_in_bindings(uses: list[Use], bindings: Bindings, *, skip_implicit: bool) -> list[str]:
    """``use: name`` for every name a use needs that the bindings do not export."""
    return [
        f"{use}: {name!r} missing from {bindings.path}"
        for use in uses
        if not (skip_implicit and use.implicit_only)
        for name in use.names
        if not bindings.has(name)
    ]


def missing_in_stubs(uses: list[Use], stubs: StubIndex) -> list[str]:
    """Uses whose class (or module attribute) lacks the member, per the stubs' classes."""
    problems = []
    for use in uses:
        if use.kind == "module":
            head, rest = use.names[0], use.names[1:2]
            ok = head in stubs.module_names and all(stubs.has_member(head, n) for n in rest)
        else:
            ok = use.owner is not None and stubs.has_member(use.owner, use.names[0])
        if not ok:
            problems.append(str(use))
    return problems


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.trt_surface")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = sub.add_parser("fetch", help="download and unpack the 10.x and 11.x bindings")
    fetch_cmd.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    for major, path in fetch(args.dest).items():
        print(f"export {ENV_VARS[major]}={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
