"""The server's layers, read from its imports: errors < models < engine < wire < rpc.

Each layer imports only the layers below it; only rpc/ talks to grpc; the engine knows no
protobuf; no two modules of the server import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server"

LAYERS = {"errors": 0, "models": 1, "engine": 2, "wire": 3, "rpc": 4}
"""Each layer's floor; server/__init__.py and the deprecated server/app.py stand on top."""

GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection")


def _module(path: Path) -> str:
    parts = path.relative_to(SERVER).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(SERVER.rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(server modules imported, other top-level packages imported) by one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            outside.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
                if not base.startswith("gradtap.server"):
                    outside.add(base)
                    continue
                base = base.removeprefix("gradtap.server").lstrip(".")
            else:
                up = package.split(".") if package else []
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                inside.add(sub if sub in known else base)
    return inside, outside


def _layer(name: str) -> int | None:
    return LAYERS.get(name.split(".")[0]) if name else None


def test_each_layer_imports_only_the_layers_below_it() -> None:
    known = _modules()
    upward = []
    for name, path in known.items():
        floor = _layer(name)
        if floor is None:
            continue
        inside, _ = _imports(name, path, known)
        upward += [f"{name} -> {other}" for other in inside if (_layer(other) or 0) > floor]
    assert upward == []


def test_only_rpc_imports_grpc_and_the_engine_knows_no_protobuf() -> None:
    known = _modules()
    wrong = []
    for name, path in known.items():
        _, outside = _imports(name, path, known)
        tops = {o.split(".")[0] for o in outside}
        if tops & set(GRPC) and _layer(name) != LAYERS["rpc"]:
            wrong.append(f"{name} imports grpc")
        contract = any(o.startswith(("gradtap.v1", "google.protobuf")) for o in outside)
        if contract and _layer(name) in (LAYERS["errors"], LAYERS["models"], LAYERS["engine"]):
            wrong.append(f"{name} imports protobuf")
    assert wrong == []


def test_no_import_circles_in_the_server() -> None:
    known = _modules()
    edges = {name: _imports(name, path, known)[0] & set(known) for name, path in known.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(edges[name]):
            if other == name:
                continue
            if state.get(other) == 1:
                circles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(known):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_layer_test_sees_the_imports_it_checks() -> None:
    """A test that cannot fail is a defect: the reader must find the arrows that are there."""
    known = _modules()
    inside, outside = _imports("rpc.servicer", known["rpc.servicer"], known)
    assert {"engine.analysis", "wire.requests", "rpc.status"} <= inside
    assert "grpc" in outside
    inside, _ = _imports("engine.analysis", known["engine.analysis"], known)
    assert {"engine.reduce", "models.model", "errors"} <= inside


def test_the_exporter_stands_beside_the_request_path() -> None:
    """server/export builds on models and the engine; no layer of the request path imports
    it, and it imports neither the wire nor rpc (nor grpc or protobuf)."""
    known = _modules()
    wrong = []
    for name, path in known.items():
        inside, outside = _imports(name, path, known)
        if name.startswith("export"):
            wrong += [f"{name} -> {o}" for o in inside if o.split(".")[0] in ("wire", "rpc")]
            wrong += [f"{name} -> {o}" for o in outside if o.startswith(("grpc", "gradtap.v1"))]
        elif _layer(name) is not None:
            wrong += [f"{name} -> {o}" for o in inside if o.startswith("export")]
    assert wrong == []
    inside, _ = _imports("export.exporter", known["export.exporter"], known)
    assert {"models.archive", "engine.analysis"} <= inside
