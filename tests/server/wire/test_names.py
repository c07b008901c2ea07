"""The wire's tables come from the contract's enums, and refuse a name one side lacks."""

from __future__ import annotations

import pytest
import torch
from gradtap.server.engine.analysis import Role
from gradtap.server.engine.reduce import Reduce
from gradtap.server.wire import names

from gradtap.v1 import gradtap_pb2 as pb


def test_every_value_of_the_contract_has_its_engine_value() -> None:
    assert names.REDUCES[pb.REDUCE_ABS_MEAN] is Reduce.ABS_MEAN
    assert {names.WIRE_REDUCES[r] for r in Reduce} == set(pb.Reduce.values()) - {0}
    assert {names.ROLES[r] for r in Role} == set(pb.TensorRole.values()) - {0}
    assert names.TORCH_DTYPES[pb.DTYPE_BFLOAT16] is torch.bfloat16
    assert len(names.TORCH_DTYPES) == len(pb.DType.values()) - 1
    assert names.ATTRIBUTION_METHODS[pb.ATTRIBUTION_METHOD_LAYER_GRAD_CAM] == "layer_grad_cam"
    assert names.INTEGRATION_METHODS[pb.INTEGRATION_METHOD_RIEMANN_LEFT] == "riemann_left"
    assert names.PERTURB_METHODS[pb.PERTURB_METHOD_PGD] == "pgd"
    assert names.NORMS == {pb.PERTURB_NORM_LINF: "Linf", pb.PERTURB_NORM_L2: "L2"}


def test_a_name_on_one_side_only_fails_the_import() -> None:
    with pytest.raises(ImportError, match=r"PerturbNorm.*'LINF'.*'LONE'"):
        names._spelled(pb.PerturbNorm, ["Lone", "L2"])
