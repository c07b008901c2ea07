"""Static checks of the Kubernetes manifests in deploy/k8s: probes, GPU, security, the Service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from ruamel.yaml import YAML

from gradtap import cli

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def load(name: str) -> dict[str, Any]:
    documents = list(YAML(typ="safe").load_all((K8S / name).read_text()))
    assert len(documents) == 1
    document: dict[str, Any] = documents[0]
    return document


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return load("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def test_the_deployment_serves_the_model_volume_on_every_interface(
    container: dict[str, Any],
) -> None:
    args = container["args"]
    assert args[0] == "serve"
    options = dict(zip(args[1::2], args[2::2]))
    assert options == {
        "--host": "0.0.0.0",
        "--port": "50051",
        "--device": "auto",
        "--model-repository": "/models",
    }
    assert container["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]


def test_every_argument_is_a_serve_option() -> None:
    command = typer.main.get_command(cli.app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    known = {opt for param in serve.params for opt in param.opts}
    args = load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert set(args[1::2]) <= known


def test_each_pod_gets_one_gpu(container: dict[str, Any]) -> None:
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_are_native_grpc_health_checks(container: dict[str, Any], probe: str) -> None:
    assert container[probe]["grpc"] == {"port": 50051}


def test_the_pod_runs_as_a_non_root_user_on_a_read_only_root(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # What must be writable is on volumes; the models are mounted read-only.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_the_grace_period_outlasts_the_servers_drain(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 10  # gradtap serve --grace's default


def test_the_service_is_headless_with_a_port_named_grpc(deployment: dict[str, Any]) -> None:
    service = load("service.yaml")
    spec = service["spec"]
    assert service["kind"] == "Service"
    assert spec["clusterIP"] == "None"
    assert spec["ports"] == [
        {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        }
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kustomize_lists_both_manifests() -> None:
    kustomization = load("kustomization.yaml")
    assert sorted(kustomization["resources"]) == ["deployment.yaml", "service.yaml"]


def test_the_model_versions_overlay_polls_and_probes_one_model() -> None:
    overlay = K8S / "model-versions"
    kustomization = next(YAML(typ="safe").load_all((overlay / "kustomization.yaml").read_text()))
    assert kustomization["resources"] == ["../"]
    (patch_path,) = [p["path"] for p in kustomization["patches"]]
    patch = next(YAML(typ="safe").load_all((overlay / patch_path).read_text()))
    assert patch["metadata"]["name"] == load("deployment.yaml")["metadata"]["name"]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    command = typer.main.get_command(cli.app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    known = {opt for param in serve.params for opt in param.opts}
    assert args[0] == "serve" and set(args[1::2]) <= known
    assert dict(zip(args[1::2], args[2::2]))["--poll-repository"] == "10"
    probe = container["readinessProbe"]["grpc"]
    assert probe["port"] == 50051 and probe["service"].startswith("gradtap.v1.model/")
