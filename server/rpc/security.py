"""Transport security and authentication: TLS credentials and bearer tokens with model allow-lists.

The token file (`gradtap serve --auth-token-file`) has one token per line, optionally followed
by whitespace and a comma-separated allow-list of the models it may use:

    # Lines starting with '#', and blank lines, are ignored.
    # This token may use every model:
    3f9c2a7e0b5d4e1f8a6c
    # This one only seed-mlp and seed-convnet:
    b71d0e9c44a2f6583e1a seed-mlp,seed-convnet
    # This one may also load, unload and pin model versions (ModelService):
    0c5e8a1f93d27b64e0aa @admin

An entry starting with "@" is a scope, not a model: `@admin` lets the token call ModelService
(model control), which no other token may. A list of scopes only restricts no model.

A token is printable ASCII without whitespace. Only SHA-256 hashes of the tokens are kept, and
compared in constant time; no token is ever logged or sent back to a caller. Audit records
name a token by the first 12 hex digits of its SHA-256 and its line in the file.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import model_service_pb2 as ms

from ..errors import PermissionDenied, RequestError, Unauthenticated
from ..models.versions import MODEL_NAME
from .handlers import behaviour_of, same_kind
from .observability import audit
from .status import status_for

_SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
_LIST_MODELS = f"/{_SERVICE}/ListModels"
CONTROL_SERVICE = ms.DESCRIPTOR.services_by_name["ModelService"].full_name
ADMIN = "@admin"
SCOPES = frozenset((ADMIN,))
"""The scopes a token file may grant."""

# Services that answer without a token: load balancers and tools must reach them.
_OPEN_SERVICES = frozenset(
    (health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")
)

_TOKEN = re.compile(r"[!-~]+")
_BEARER = re.compile(r"bearer +(\S+) *", re.IGNORECASE)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients must present a certificate
    that this CA signed (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


@dataclass(frozen=True)
class Grant:
    """What one token may do: every model when `models` is None, else only those named;
    model control with the scope @admin."""

    digest: bytes = field(repr=False)
    models: frozenset[str] | None
    line: int
    scopes: frozenset[str] = frozenset()

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def caller(self) -> dict[str, Any]:
        """Who the token is, for an audit record: never the token itself."""
        return {"caller": "sha256:" + self.digest.hex()[:12], "token_line": self.line}


def parse_tokens(text: str, source: str = "token file") -> list[Grant]:
    """Parses the token file format (see the module docstring).

    Raises:
        ValueError: a malformed line, a repeated token, or no token at all; the message names
            the line, never the token.
    """
    grants: list[Grant] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, _, rest = line.replace("\t", " ").partition(" ")
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"{source} line {number}: a token must be printable ASCII")
        models: frozenset[str] | None = None
        scopes: frozenset[str] = frozenset()
        if rest.strip():
            names = [name.strip() for name in rest.split(",")]
            for position, name in enumerate(names, start=1):
                # The entry is not quoted: a misplaced token must not reach a log.
                if not MODEL_NAME.fullmatch(name) and name not in SCOPES:
                    raise ValueError(
                        f"{source} line {number}: expected 'TOKEN' or 'TOKEN model-a,model-b'; "
                        f"allow-list entry {position} is not a model name or "
                        f"{' or '.join(sorted(SCOPES))}"
                    )
            scopes = frozenset(n for n in names if n in SCOPES)
            models = frozenset(n for n in names if n not in SCOPES) or None
        digest = _digest(token)
        for earlier in grants:
            if hmac.compare_digest(earlier.digest, digest):
                raise ValueError(f"{source} line {number} repeats the token of line {earlier.line}")
        grants.append(Grant(digest=digest, models=models, line=number, scopes=scopes))
    if not grants:
        raise ValueError(f"{source} holds no token: every call would be refused")
    return grants


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | RequestError:
    """The token of the call's single `authorization: Bearer <token>` entry, or the error."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return Unauthenticated(
            "missing bearer token: send 'authorization: Bearer <token>' metadata",
            reason="MISSING_TOKEN",
        )
    match = _BEARER.fullmatch(values[0]) if len(values) == 1 else None
    if match is None:
        return Unauthenticated(
            "the authorization metadata must be one 'Bearer <token>'", reason="INVALID_TOKEN"
        )
    return match.group(1)


Check = Callable[[Any], None]
"""Raises RequestError when the request may not proceed."""


class TokenAuth(grpc.ServerInterceptor):  # type: ignore[misc]
    """Requires a known bearer token on every call except health and reflection.

    A missing or unknown token is UNAUTHENTICATED. A token with a model allow-list gets
    PERMISSION_DENIED for requests whose `model.name` it does not list, and ListModels
    answers only with the models it lists.
    """

    def __init__(self, grants: Sequence[Grant]) -> None:
        self._grants = tuple(grants)

    @property
    def has_admin(self) -> bool:
        """Whether any token may call ModelService."""
        return any(grant.admin for grant in self._grants)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuth:
        """Reads a token file; raises ValueError (naming lines, not tokens) when malformed."""
        try:
            text = path.read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise ValueError(f"token file {path}: tokens must be printable ASCII") from None
        return cls(parse_tokens(text, f"token file {path}"))

    def grant(self, metadata: Iterable[tuple[str, Any]] | None) -> Grant | RequestError:
        """The grant of the call's token, or why the call is refused."""
        token = _bearer(metadata)
        if isinstance(token, RequestError):
            return token
        try:
            digest = _digest(token)
        except UnicodeEncodeError:
            digest = b""
        found = None
        # Compare against every token so the time taken says nothing about which matched.
        for grant in self._grants:
            if hmac.compare_digest(grant.digest, digest) and found is None:
                found = grant
        if found is None:
            return Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")
        return found

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.lstrip("/").split("/", 1)[0] in _OPEN_SERVICES:
            return handler
        grant = self.grant(handler_call_details.invocation_metadata)
        if method.startswith(f"/{CONTROL_SERVICE}/"):
            return _control(handler, grant)
        if isinstance(grant, RequestError):
            return _refused(handler, grant)
        if grant.models is None:
            return handler
        respond = _only(grant.models) if method == _LIST_MODELS else None
        return _guarded(handler, _model_check(grant), respond)


def _control(handler: grpc.RpcMethodHandler, grant: Grant | RequestError) -> grpc.RpcMethodHandler:
    """A model-control call: only a token with @admin; the caller goes in its audit record."""
    if isinstance(grant, RequestError):
        return _refused(handler, grant, {"caller": "no valid token"})
    if not grant.admin:
        denied = PermissionDenied(
            f"model control needs a token with the scope {ADMIN} (token file line {grant.line} "
            "has none)",
            reason="ADMIN_REQUIRED",
        )
        return _refused(handler, denied, grant.caller)
    behaviour = behaviour_of(handler)

    def audited(request_or_requests: Any, context: grpc.ServicerContext) -> Any:
        audit(**grant.caller)
        return behaviour(request_or_requests, context)

    return same_kind(handler, audited)


def _model_check(grant: Grant) -> Check:
    def check(request: Any) -> None:
        descriptor = getattr(request, "DESCRIPTOR", None)
        if descriptor is None or "model" not in descriptor.fields_by_name:
            return
        name = request.model.name
        if not grant.allows(name):
            raise PermissionDenied(
                f"this token may not use model {name[:128]!r}", reason="MODEL_NOT_ALLOWED"
            )

    return check


def _only(allowed: frozenset[str]) -> Callable[[Any], Any]:
    def respond(response: pb.ListModelsResponse) -> pb.ListModelsResponse:
        filtered = pb.ListModelsResponse()
        filtered.CopyFrom(response)
        del filtered.models[:]
        filtered.models.extend(m for m in response.models if m.name in allowed)
        return filtered

    return respond


def _abort(context: grpc.ServicerContext, error: RequestError) -> NoReturn:
    context.abort_with_status(status_for(error))
    raise AssertionError("abort_with_status returns only by raising")


def _refused(
    handler: grpc.RpcMethodHandler, error: RequestError, facts: dict[str, Any] | None = None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind that ends every call with `error`, before reading requests;
    `facts` go into the call's audit record."""

    def refuse(request_or_requests: Any, context: grpc.ServicerContext) -> Any:
        if facts:
            audit(**facts)
        _abort(context, error)

    return same_kind(handler, refuse)


def _guarded(
    handler: grpc.RpcMethodHandler, check: Check, respond: Callable[[Any], Any] | None
) -> grpc.RpcMethodHandler:
    """The same handler with `check` run on each request (a RequestError from it ends the
    call with its google.rpc.Status) and `respond` applied to a single response."""
    behaviour = behaviour_of(handler)

    def checked(requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            check(request)
            yield request

    def answer(response: Any) -> Any:
        return respond(response) if respond is not None else response

    def unary_in(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            check(request)
        except RequestError as e:
            _abort(context, e)
        return answer(behaviour(request, context))

    def stream_in(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        try:
            return answer(behaviour(checked(requests), context))
        except RequestError as e:
            _abort(context, e)

    def stream_in_out(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behaviour(checked(requests), context)
        except RequestError as e:
            _abort(context, e)

    if handler.request_streaming:
        return same_kind(handler, stream_in_out if handler.response_streaming else stream_in)
    return same_kind(handler, unary_in)
