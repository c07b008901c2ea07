"""gradtap.client: call a gradtap server from any process; needs grpcio, protobuf and numpy only.

from gradtap.client import Client, Objective
with Client("127.0.0.1:50051") as c:
    r = c.analyze("seed-convnet", x, targets=["relu_1"], objective=Objective.cross_entropy([3]))
    r.gradients["relu_1"]
"""

from ._client import Client
from ._errors import ErrorDetails, FieldViolation, GradtapError
from ._many import Aggregate, AsyncResultStream, ResultStream
from ._objective import Objective
from ._perturb import PerturbResult
from ._plot import plot as plot_attribution
from ._result import ModelDescription, ModelInfo, Node, Result, TensorSpec
from ._shm import SharedRegion
from ._target import Reduction, Target

__all__ = [
    "Aggregate",
    "AsyncResultStream",
    "Client",
    "ErrorDetails",
    "FieldViolation",
    "GradtapError",
    "ModelDescription",
    "ModelInfo",
    "Node",
    "Objective",
    "PerturbResult",
    "Reduction",
    "Result",
    "ResultStream",
    "SharedRegion",
    "Target",
    "TensorSpec",
    "plot_attribution",
]
