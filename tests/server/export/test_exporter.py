"""The exporter's sources and errors: timm and torchvision where they import, and a clear
cause when torch cannot export a model."""

from __future__ import annotations

import pytest
import torch
from gradtap.server.export import ExportError, ExportOptions, export
from gradtap.server.export.exporter import _exported
from gradtap.server.export.source import Source
from torch import nn


@pytest.mark.parametrize("source", ["timm:resnet18", "torchvision:resnet18"])
def test_timm_and_torchvision_sources_export_where_the_library_imports(source: str) -> None:
    library = source.partition(":")[0]
    try:
        __import__(library)
    except Exception as e:  # torchvision 0.28's wheel cannot load on the CPU build of torch
        with pytest.raises(ExportError, match=f"need {library}, which cannot be imported"):
            export(source, ExportOptions(input_shape=(3, 32, 32)))
        pytest.skip(f"{library} cannot be imported here ({type(e).__name__}: {e})")
    result = export(source, ExportOptions(input_shape=(3, 32, 32)))
    assert result.worst_ratio <= 1.0
    assert [s.name for s in result.model.inputs] == ["x"]
    assert result.model.inputs[0].dims[0].name == "batch"


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a value: torch.export cannot trace it
            return x * 2
        return x


def test_a_model_torch_cannot_export_is_an_error_naming_torchs_cause() -> None:
    x = torch.randn(2, 3)
    batch = torch.export.Dim("batch", min=1, max=8)
    source = Source(module=DataDependent(), inputs={"x": x}, dims={"x": {0: batch}})
    with pytest.raises(ExportError) as e:
        _exported(source)
    message = str(e.value)
    assert message.startswith("torch could not export the model: ")
    assert "data-dependent" in message.lower() or "GuardOnDataDependent" in message


def test_an_unknown_source_kind_is_an_error_listing_the_kinds() -> None:
    with pytest.raises(ExportError, match="hf:DIRECTORY, timm:NAME, torchvision:NAME"):
        export("keras:model.h5")
