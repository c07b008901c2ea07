"""Running the gradtap CLI as a real subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "gradtap.cli"]
RTOL = 1e-5


def gradtap(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the CLI with no GRADTAP_* settings inherited from the caller's environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRADTAP_")}
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def image(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 28, 28)).astype(np.float32)
