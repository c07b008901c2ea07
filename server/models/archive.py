"""Safe loading of torch.export archives: closing every door torch would open.

Archives are untrusted files. `torch.export.load` alone would unpickle sample inputs and
pickled weights, evaluate symbolic-shape strings with sympy, and run any `torch.*` callable
a graph names. `load_archive` closes each of those doors before torch sees the file.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import ModelLoadError
from .padding import declared_padding
from .structures import Renamed, plain_structures

_SYMPY_WORDS = frozenset(
    {
        # sympy classes and constants that srepr/str of shape expressions use
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "sqrt",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "Piecewise",
        "ITE",
        "true",
        "false",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "One",
        "Zero",
        "NegativeOne",
        "Half",
        "I",
        # torch.utils._sympy.functions
        "CeilDiv",
        "CeilToInt",
        "CleanDiv",
        "FloatPow",
        "FloatTrueDiv",
        "FloorDiv",
        "FloorToInt",
        "Identity",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "LShift",
        "ModularIndexing",
        "PowByNatural",
        "PythonMod",
        "RShift",
        "RoundDecimal",
        "RoundToInt",
        "ToFloat",
        "TruncToFloat",
        "TruncToInt",
        "Where",
        # assumptions passed to Symbol(...)
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "zero",
        "nonzero",
        "commutative",
        "extended_real",
        "rational",
    }
)
_SYM_TOKEN = re.compile(
    r"\s+"
    r"|'[a-z]{1,8}[0-9]{1,9}'"  # a quoted symbol name, e.g. 's77'
    r"|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"  # a number
    r"|[A-Za-z][A-Za-z0-9_]*"  # a word, checked against the allow-list below
    r"|[-+*/%(),=<>!&|~]"  # operators and punctuation; no '.', '[', quotes or backslashes
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")


def _check_sym_expr(expr: str) -> None:
    """Refuses a shape expression that could do more than arithmetic when sympy evaluates it."""
    if len(expr) > 4096:
        raise ModelLoadError("a symbolic shape expression is too long")
    pos = 0
    while pos < len(expr):
        m = _SYM_TOKEN.match(expr, pos)
        if m is None:
            raise ModelLoadError(f"unexpected character in a symbolic shape expression: {expr!r}")
        word = m.group()
        if word[0].isalpha() and word not in _SYMPY_WORDS and not _SYMBOL_NAME.fullmatch(word):
            raise ModelLoadError(f"unknown name {word!r} in a symbolic shape expression")
        pos = m.end()


def _walk_expr_strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr_str" and isinstance(value, str):
                yield value
            else:
                yield from _walk_expr_strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk_expr_strings(value)


def _json_object(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    """An archive member that must hold a JSON object."""
    shown = name.split("/", 1)[-1]
    try:
        document = json.loads(archive.read(name))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"{shown} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(document, dict):
        raise ModelLoadError(f"{shown} must hold a JSON object, not {type(document).__name__}")
    return document


def _check_payload_config(config: dict[str, Any], what: str) -> None:
    entries = config.get("config", {})
    if not isinstance(entries, dict) or not all(isinstance(m, dict) for m in entries.values()):
        raise ModelLoadError(f"the {what}s' config must map names to JSON objects")
    for fqn, meta in entries.items():
        if meta.get("use_pickle"):
            raise ModelLoadError(f"{what} {fqn!r} is pickled; only raw tensors are accepted")
        path = str(meta.get("path_name", ""))
        if what == "constant" and not path.startswith("tensor_"):
            raise ModelLoadError(f"constant {fqn!r} is a Python object; only tensors are accepted")


def _sanitized_archive(data: bytes) -> tuple[bytes, list[Renamed]]:
    """Checks a torch.export archive and returns a copy torch can load without executing it,
    with the structure nodes it rewrote into dicts (server/models/structures.py)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ModelLoadError("not a zip archive (torch.export.save writes one)") from e
    names = archive.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not names:
        raise ModelLoadError("an archive must hold exactly one top-level folder")
    root = roots.pop()
    models = [n for n in names if n.startswith(f"{root}/models/") and n.endswith(".json")]
    if models != [f"{root}/models/model.json"]:
        raise ModelLoadError("an archive must hold exactly one program, models/model.json")
    for name in names:
        rel = name[len(root) + 1 :]
        if rel.startswith(("data/aotinductor", "data/weights/model.pt", "data/constants/model.pt")):
            raise ModelLoadError(f"refusing {rel!r}: compiled code or pickled legacy weights")
        if rel.endswith((".so", ".dll", ".dylib", ".pyc", ".py")):
            raise ModelLoadError(f"refusing {rel!r}: archives may not carry code")
    weights_config = f"{root}/data/weights/model_weights_config.json"
    constants_config = f"{root}/data/constants/model_constants_config.json"
    for config, what in ((weights_config, "weight"), (constants_config, "constant")):
        if config not in names:
            raise ModelLoadError(f"missing {config[len(root) + 1 :]}")
        _check_payload_config(_json_object(archive, config), what)

    program = _json_object(archive, f"{root}/models/model.json")
    for expr in _walk_expr_strings(program):
        _check_sym_expr(expr)
    # Guards are Python source that torch would compile into ExportedProgram.module(); the
    # server never calls module(), and drops them so that nothing later can.
    program["guards_code"] = []
    renamed = plain_structures(program)

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as sanitized:
        for info in archive.infolist():
            rel = info.filename[len(root) + 1 :]
            if rel == "models/model.json":
                payload = json.dumps(program).encode()
            elif rel.startswith("data/sample_inputs/"):
                payload = b""  # torch would unpickle these; the server never needs them
            else:
                payload = archive.read(info.filename)
            sanitized.writestr(info.filename, payload)
    return out.getvalue(), renamed


_SAFE_PY_CALLABLES: frozenset[Callable[..., Any]] = frozenset(
    [
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.abs,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        operator.xor,
        operator.not_,
        operator.invert,
        operator.lshift,
        operator.rshift,
        math.floor,
        math.ceil,
        math.trunc,
        math.sqrt,
        torch.sym_int,
        torch.sym_float,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
        torch.sym_ite,
        torch.sym_sqrt,
        torch.sym_sum,
        torch._assert,
        torch._check,
        torch._check_is_size,
    ]
)
_SAFE_HIGHER_ORDER = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
    }
)
_SAFE_OP_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed"})


def _check_graph(program: ExportedProgram) -> None:
    """Refuses graphs that call anything but tensor operators and plain arithmetic."""
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise ModelLoadError(f"node {node.name!r}: unsupported op kind {node.op!r}")
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                if target.namespace not in _SAFE_OP_NAMESPACES:
                    raise ModelLoadError(f"node {node.name!r}: operator {target} is not allowed")
            elif isinstance(target, torch._ops.HigherOrderOperator):
                if target.name() not in _SAFE_HIGHER_ORDER:  # type: ignore[no-untyped-call]
                    raise ModelLoadError(f"node {node.name!r}: operator {target} is not allowed")
            elif target not in _SAFE_PY_CALLABLES:
                raise ModelLoadError(f"node {node.name!r}: call target {target!r} is not allowed")
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.CUSTOM_OBJ, InputKind.TOKEN):
            raise ModelLoadError(
                f"input {spec.arg.name!r}: {spec.kind.name} inputs are unsupported"
            )


OPTIONS_FILE = "gradtap.json"
"""Per-model options an archive may carry: torch.export.save(..., extra_files={OPTIONS_FILE: ...}).

Known keys: {"batching": false} opts the model out of dynamic batching; {"dims": {"s77":
"batch", "s53": "sequence"}} names the dynamic dimensions by their symbol (gradtap export
writes it); {"padding": {"mask": "attention_mask", "side": "left", "pad_token_id": 0}}
declares how rows of different lengths are padded (server/models/padding.py)."""

_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")


def archive_options(data: bytes) -> dict[str, Any]:
    """The archive's gradtap options (JSON, never code); empty when it has none."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ModelLoadError("not a zip archive (torch.export.save writes one)") from e
    names = [n for n in archive.namelist() if n.endswith(f"/extra/{OPTIONS_FILE}")]
    if not names:
        return {}
    options = _json_object(archive, names[0])
    if not set(options) <= {"batching", "dims", "padding"}:
        raise ModelLoadError(f"extra/{OPTIONS_FILE} may only set: batching, dims, padding")
    if not isinstance(options.get("batching", True), bool):
        raise ModelLoadError(f"extra/{OPTIONS_FILE}: batching must be true or false")
    dims = options.get("dims", {})
    if not isinstance(dims, dict) or not all(
        isinstance(k, str)
        and _SYMBOL_NAME.fullmatch(k)
        and isinstance(v, str)
        and _DIM_NAME.fullmatch(v)
        for k, v in dims.items()
    ):
        raise ModelLoadError(
            f"extra/{OPTIONS_FILE}: dims must map symbols (s77) to names (batch, sequence)"
        )
    declared_padding(options, f"extra/{OPTIONS_FILE}")
    return options


@dataclass
class Archive:
    """A loaded archive: its program, its gradtap options and the structures it renamed."""

    program: ExportedProgram
    options: dict[str, Any] = field(default_factory=dict)
    renamed: list[Renamed] = field(default_factory=list)
    """The archive's own output (and input) classes, served as dicts of their fields."""
    tokenizer_json: str | None = None
    """The text of the tokenizer.json the archive carries in its extra files, if any."""


def read_archive(data: bytes) -> Archive:
    """Loads a torch.export archive's bytes without unpickling, importing or evaluating
    anything in it."""
    try:
        options = archive_options(data)
        tokenizer_json = _extra_text(data, "tokenizer.json")
        sanitized, renamed = _sanitized_archive(data)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        # a member's CRC or compressed stream is wrong, or its compression is unknown
        raise ModelLoadError(f"the archive is corrupt: {str(e)[:200]}") from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as e:
        raise ModelLoadError(
            f"the archive's JSON has a member of the wrong type or shape: "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    with _TorchLoadErrors() as errors:
        try:
            program = torch.export.load(io.BytesIO(sanitized))
        except ModelLoadError:
            raise
        except Exception as e:  # torch's own errors on malformed archives
            raise ModelLoadError(f"torch could not read the archive: {errors.cause(e)}") from e
    _check_graph(program)
    return Archive(program, options, renamed, tokenizer_json)


def _extra_text(data: bytes, name: str) -> str | None:
    """The text of one of the archive's extra files (data, never run), if it has it."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    found = [n for n in archive.namelist() if n.endswith(f"/extra/{name}")]
    if not found:
        return None
    try:
        return archive.read(found[0]).decode()
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"extra/{name} is not UTF-8 text") from e


def load_archive(data: bytes) -> ExportedProgram:
    """The program of an archive's bytes (see read_archive)."""
    return read_archive(data).program


class _TorchLoadErrors(logging.Handler):
    """Keeps what torch.export.load logs while it runs. torch logs the real cause of a failed
    load as a warning and then raises a RuntimeError that names none."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def __enter__(self) -> _TorchLoadErrors:
        logging.getLogger("torch.export").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch.export").removeHandler(self)

    def cause(self, raised: BaseException) -> str:
        """The innermost error behind `raised`, or behind what torch logged: its message."""
        error = self.errors[0] if self.errors else raised
        while error.__cause__ is not None or (
            error.__context__ is not None and not error.__suppress_context__
        ):
            error = error.__cause__ or error.__context__  # type: ignore[assignment]
        text = " ".join(str(error).split()) or type(error).__name__
        return text if len(text) <= 300 else text[:300] + "..."
