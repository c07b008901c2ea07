"""gradtap.client: call a gradtap server from any process; needs grpcio, protobuf and numpy only.

from gradtap.client import Client, Objective
with Client("127.0.0.1:50051") as c:
    r = c.analyze("seed-convnet", x, targets=["relu_1"], objective=Objective.cross_entropy([3]))
    r.gradients["relu_1"]
"""

from ._client import Client
from ._errors import ErrorDetails, FieldViolation, GradtapError
from ._objective import Objective
from ._result import ModelDescription, ModelInfo, Node, Result, TensorSpec

__all__ = [
    "Client",
    "ErrorDetails",
    "FieldViolation",
    "GradtapError",
    "ModelDescription",
    "ModelInfo",
    "Node",
    "Objective",
    "Result",
    "TensorSpec",
]
