"""The client names the CLI uses, imported once for every command module.

mypy runs over the source tree, where gradtap.client is the top-level client/ package:
pyproject's package-dir mapping lives in the editable install's import hook, which mypy
cannot follow. At run time the names come from the installed gradtap.client.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import client as gradtap_client
else:
    import gradtap.client as gradtap_client

AttributionResult = gradtap_client.AttributionResult
Client = gradtap_client.Client
GradtapError = gradtap_client.GradtapError
ModelInfo = gradtap_client.ModelInfo
Objective = gradtap_client.Objective
PerturbResult = gradtap_client.PerturbResult
Result = gradtap_client.Result
TensorSpec = gradtap_client.TensorSpec
TokenAttributionResult = gradtap_client.TokenAttributionResult
