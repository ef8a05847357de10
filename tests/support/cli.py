"""Run the `gateway` command line in a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *arguments: str, environ: dict[str, str] | None = None, timeout: float = 60, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ARGUMENTS` with this checkout first on the import path."""
    environment = {**os.environ, **(environ or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,
    )
