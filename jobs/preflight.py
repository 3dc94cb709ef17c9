"""The first import of every script a user runs: stop with what to do when this Python lacks the project.

``python jobs/<job>.py`` (or ``python serve/app.py``) run by a Python without the project's dependencies would
otherwise die on the first third-party import (``No module named 'pyarrow'``). The usual cause is
``ray job submit -- python ...``: the job's ``python`` is the first one on the PATH of the process that ran
``ray start``, which is the system Python unless the head was started from the activated venv. This module
uses the standard library only and imports nothing it checks, so it runs before any of them fails.
"""

from __future__ import annotations

import importlib.util
import os
import sys

REQUIRED_MODULES = ("ray", "torch", "transformers", "pyarrow", "yaml", "faiss")
"""Import names of the dependencies every job needs (pyproject.toml lists them with their pins)."""

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of a driver that ``ray job submit`` started."""


def missing_modules(names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    """The modules of ``names`` this interpreter cannot import (looked up, not imported)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def advice(missing: list[str], executable: str, submitted: bool) -> str:
    """What the user reads: which Python lacks what, and the command that fixes it."""
    lines = [
        f"medrag-ray: this Python ({executable}) does not have the project's dependencies "
        f"(cannot import {', '.join(missing)}).",
    ]
    if submitted:
        lines += [
            "This job was started by `ray job submit`, whose `python` is the first one on the PATH of the process "
            "that ran `ray start`. Start the Ray head from the project's venv and submit again:",
            "    ray stop && source .venv/bin/activate && ray start --head ...",
            "(on a cluster, use the image from cluster/Dockerfile, which installs the project).",
        ]
    else:
        lines += [
            "Install the project and run the script with its venv's Python:",
            "    python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python " + " ".join(sys.argv[:1]),
        ]
    return "\n".join(lines)


def check_interpreter() -> None:
    """Exit with :func:`advice` (status 1) when a required module is missing; return quietly otherwise."""
    missing = missing_modules()
    if missing:
        submitted = bool(os.environ.get(SUBMITTED_JOB_ENV))
        raise SystemExit(advice(missing, sys.executable, submitted) + "\n")


check_interpreter()
