"""A/B: this tree's server against the servers of earlier commits, side by side in one run.

`python -m bench --compare 54cfe66,main` checks each ref out of git into a temporary folder and
serves it with this environment's packages; every round then makes the same calls to every
server in rotating order: ResNet-18's gradients (the overhead case), a batch-1 seed-mlp call
(the small-call case, the median of a block of calls) and a 64 MiB result (transport).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._common import ROOT, SERVING, Child, Config, Section, interleaved, ratios, stats
from ._common import thread_env as base_env
from .models import REPEAT_WIDTH, RESNET_TARGETS, repeat_name

SMALL_BLOCK = 50
"""Small calls per timed block; a round's figure is their mean."""


def checkout(ref: str, directory: Path) -> Path:
    """`ref`'s tree laid out as the installed package (gradtap/, gradtap/server, gradtap/client);
    returns the folder to put first on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True
    ).stdout
    source = directory / "source"
    source.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package = directory / "package"
    shutil.copytree(source / "gradtap", package / "gradtap")
    for part in ("server", "client"):
        (package / "gradtap" / part).symlink_to(source / part, target_is_directory=True)
    return package


class RefServer(Child):
    """`gradtap serve` of an earlier commit, with this environment's packages."""

    def __init__(self, package: Path, threads: int, repository: Path) -> None:
        env = base_env(threads)
        env["PYTHONPATH"] = os.pathsep.join([str(package), env["PYTHONPATH"]])
        script = "import sys; from gradtap.cli import main; sys.argv[0] = 'gradtap'; main()"
        command = [sys.executable, "-c", script, "serve", "--port", "0", "--device", "cpu"]
        command += ["--grace", "0", "--model-repository", str(repository)]
        super().__init__(command, SERVING, env, timeout=180)
        self.address = f"127.0.0.1:{self.match.group(3)}"


def run(cfg: Config, refs: list[str], address: str, repository: Path) -> Section:
    from gradtap.client import Client, Objective

    section = Section("ab")
    rng = np.random.default_rng(0)
    image = rng.standard_normal((cfg.resnet_batch, 3, cfg.resnet_image, cfg.resnet_image))
    image = image.astype(np.float32)
    small = rng.standard_normal((1, 784)).astype(np.float32)
    wide = rng.standard_normal((1, REPEAT_WIDTH)).astype(np.float32)
    big = repeat_name(cfg.naive_bytes[0])
    with tempfile.TemporaryDirectory(prefix="gradtap-ab-") as tmp:
        servers: dict[str, Any] = {}
        try:
            for ref in refs:
                servers[ref] = RefServer(checkout(ref, Path(tmp, ref)), cfg.threads, repository)
            addresses = {"this tree": address, **{r: s.address for r, s in servers.items()}}
            clients = {name: Client(a, timeout=600) for name, a in addresses.items()}
            cases: dict[str, Callable[[Any], Any]] = {
                "ResNet-18 gradients (overhead case)": lambda c: c.analyze(
                    "resnet18", image, list(RESNET_TARGETS), Objective.sum(),
                    input_grads=True, outputs=False,
                ),
                f"seed-mlp batch 1, mean of {SMALL_BLOCK} calls": lambda c: _block(
                    lambda: c.analyze("seed-mlp", small, ["relu_1"], Objective.sum())
                ),
                f"{cfg.naive_bytes[0] >> 20} MiB result": lambda c: c.analyze(big, wide),
            }  # fmt: skip
            for case, call in cases.items():
                variants = {name: functools.partial(call, c) for name, c in clients.items()}
                series = interleaved(variants, rounds=cfg.repeats, budget_s=cfg.budget_s, warmup=2)
                if case.startswith("seed-mlp"):  # per call
                    series = {k: [v / SMALL_BLOCK for v in vs] for k, vs in series.items()}
                base = series["this tree"]
                for name, values in series.items():
                    section.row(
                        f"{case}: {name}",
                        "ms",
                        [v * 1e3 for v in values],
                        ratio=ratios(values, base),
                        ratio_to="this tree",
                    )
                for ref in refs:
                    change = stats(ratios(base, series[ref]))
                    section.info.setdefault("this_tree_over_ref", {}).setdefault(ref, {})[case] = (
                        change
                    )
            for c in clients.values():
                c.close()
        finally:
            for server in servers.values():
                server.stop()
    section.notes.append(
        f"Servers of {', '.join(refs)} (git archive of each ref, run with this environment's "
        "packages) beside this tree's main server, the same calls in rotating order each "
        "round; ratios are each server's time over this tree's (above 1: slower than this "
        "tree). No target: this is issue 9's no-regression check."
    )
    return section


def _block(call: Callable[[], Any]) -> None:
    for _ in range(SMALL_BLOCK):
        call()
