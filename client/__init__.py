"""gradtap.client: call a gradtap server from any process; needs grpcio, protobuf and numpy only.

from gradtap.client import Client, Objective
with Client("127.0.0.1:50051") as c:
    r = c.analyze("seed-convnet", x, ["relu_1"], Objective.cross_entropy([3]))
    r.gradients["relu_1"]

gradtap.client.aio.Client has the same methods, awaitable. docs/concepts.md holds the words.
"""

from ._client import Client, ResultStream
from ._errors import ErrorDetails, FieldViolation, GradtapError
from ._objective import Objective
from ._plot import plot as plot_attribution
from ._result import (
    Aggregate,
    AttributionResult,
    ModelDescription,
    ModelInfo,
    ModelVersion,
    Node,
    PerturbResult,
    Result,
    TensorSpec,
    TokenAttributionResult,
)
from ._shm import SharedRegion
from ._target import Reduction, Target
from .aio import AsyncResultStream

__all__ = [
    "Aggregate",
    "AsyncResultStream",
    "AttributionResult",
    "Client",
    "ErrorDetails",
    "FieldViolation",
    "GradtapError",
    "ModelDescription",
    "ModelInfo",
    "ModelVersion",
    "Node",
    "Objective",
    "PerturbResult",
    "Reduction",
    "Result",
    "ResultStream",
    "SharedRegion",
    "Target",
    "TensorSpec",
    "TokenAttributionResult",
    "plot_attribution",
]
