"""The model-control servicer, thin: each RPC checks its request (wire), changes the registry
(models) and answers (wire), with an audit record of what it did in the call's log line.

Registered only with `gradtap serve --model-control`; security.py lets only tokens holding
@admin reach it. Errors leave through `status_mapped`, as everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from gradtap.v1 import model_service_pb2 as ms

from ..errors import FailedPrecondition, InvalidArgument
from ..models.registry import Registry
from ..models.repository import MAX_ARCHIVE_BYTES, Repository
from ..models.versions import LoadFailed
from ..wire import control
from .observability import audit
from .status import status_mapped

UNPACKED_PER_UPLOADED = 4
"""An upload may expand to at most this many times --max-upload-bytes (a zip-bomb cap), and
never past --max-archive-bytes."""


class ModelServicer:
    """Implements gradtap.v1.ModelService over the registry and the model repository."""

    def __init__(
        self,
        registry: Registry,
        repository: Repository | None,
        max_upload_bytes: int,
        max_archive_bytes: int = MAX_ARCHIVE_BYTES,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.max_upload_bytes = max_upload_bytes
        self.max_unpacked = min(UNPACKED_PER_UPLOADED * max_upload_bytes, max_archive_bytes)

    @status_mapped
    def LoadModel(
        self, requests: Iterator[ms.LoadModelRequest], context: grpc.ServicerContext
    ) -> ms.LoadModelResponse:
        upload = control.upload(requests, self.max_upload_bytes)
        audit(
            model=upload.name,
            version=upload.version or "(next)",
            bytes=len(upload.data),
            archive_digest=upload.digest,
        )
        try:
            model = self.registry.load(
                upload.name,
                upload.version,
                upload.data,
                "upload",
                keep_failure=False,
                max_unpacked=self.max_unpacked,
            )
        except LoadFailed as e:
            audit(outcome=f"refused: {e.reason}")
            raise e.cause or InvalidArgument(
                f"the archive was refused: {e.reason}", reason="BAD_ARCHIVE", field="chunk"
            ) from None
        audit(version=model.version, digest=model.digest, outcome="READY")
        return control.loaded(self.registry.status(model.name), model)

    @status_mapped
    def LoadModelFromRepository(
        self, request: ms.LoadModelFromRepositoryRequest, context: grpc.ServicerContext
    ) -> ms.LoadModelFromRepositoryResponse:
        name = control.name(request.name, "name")
        version = control.version(request.version, "version")
        audit(model=name, version=version or "(all)")
        if self.repository is None:
            raise FailedPrecondition(
                "this server has no model repository (--model-repository)",
                reason="NO_REPOSITORY",
            )
        try:
            loaded = self.repository.load(name, version)
        except LoadFailed as e:
            audit(outcome=f"failed: {e.reason}")
            raise e.cause or FailedPrecondition(
                f"the repository's archive was refused: {e.reason}", reason="LOAD_FAILED"
            ) from None
        audit(outcome=f"READY: {', '.join(loaded)}")
        return control.from_repository(self.registry.status(name))

    @status_mapped
    def UnloadModel(
        self, request: ms.UnloadModelRequest, context: grpc.ServicerContext
    ) -> ms.UnloadModelResponse:
        name = control.name(request.name, "name")
        version = control.version(request.version, "version")
        audit(model=name, version=version or "(all)")
        self.registry.unload(name, version)
        audit(outcome="unloaded")
        return control.unloaded(self.registry.status(name))

    @status_mapped
    def SetDefaultVersion(
        self, request: ms.SetDefaultVersionRequest, context: grpc.ServicerContext
    ) -> ms.SetDefaultVersionResponse:
        name = control.name(request.name, "name")
        version = control.version(request.version, "version")
        audit(model=name, version=version or "(newest)")
        self.registry.set_default(name, version)
        audit(outcome="default set")
        return control.default_set(self.registry.status(name))
