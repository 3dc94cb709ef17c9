"""Which training run a job resumes: a run's identity and the run folder it names.

A training job resumes "its" run from the last checkpoint. A run is only ever its own if it trains the same
thing: the same task builder with the same arguments (the init model, the dataset, the domains, LoRA and loss
settings) and the same training-loop settings (epochs, batch size, learning rate, precision, seed). That is the
run's :func:`run_identity`; :func:`run_folder_name` appends its fingerprint to the job's ``run_name``, so

* re-running a command resumes its run (same identity, same folder);
* the same ``run_name`` with another config (e.g. ``jobs/train_router.py`` on the 4-domain real routing set after
  the pipeline trained the 3-domain synthetic router) is a new run in its own folder, never a resume of a
  checkpoint of another shape;
* how the run is executed (workers, CPUs, failures allowed, storage, checkpoints kept) is not part of the identity:
  a run can resume on more or fewer workers.

The identity is written beside the run (:data:`IDENTITY_FILE`), so a person can tell the folders apart and a
resume can check that the folder really is this run's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

IDENTITY_FILE = "medrag_run.json"
FINGERPRINT_CHARS = 10


def _plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses by field, paths as strings; other objects by their type's name
    (an object without a stable value -- a model, a lambda -- identifies the run only by what it is)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if callable(value):
        return _qualified_name(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def run_identity(task_factory: Callable[..., Any], train_cfg: Any) -> dict[str, Any]:
    """What a run trains: the task builder (a ``functools.partial``'s function and its arguments, or the
    callable's qualified name) and the training-loop config ``train_cfg`` (a dataclass)."""
    if isinstance(task_factory, functools.partial):
        task: dict[str, Any] = {
            "builder": _qualified_name(task_factory.func),
            "args": _plain(list(task_factory.args)),
            "kwargs": _plain(dict(task_factory.keywords)),
        }
    else:
        task = {"builder": _qualified_name(task_factory)}
    return {"task": task, "train": _plain(train_cfg)}


def fingerprint(identity: dict[str, Any]) -> str:
    """A short, stable hash of an identity (canonical JSON, SHA-256)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def run_folder_name(name: str, identity: dict[str, Any]) -> str:
    """``<name>-<fingerprint>``: the folder (Ray Train run name) of the run ``name`` with this identity."""
    return f"{name}-{fingerprint(identity)}"


def write_identity(run_dir: Path, name: str, identity: dict[str, Any]) -> None:
    """Record ``identity`` in ``run_dir`` (created if needed); a folder that holds another identity is refused
    (a fingerprint collision, or a folder copied by hand), so no checkpoint of another run is ever resumed."""
    path = run_dir / IDENTITY_FILE
    record = {"name": name, "identity": identity}
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != record:
            raise RuntimeError(
                f"run folder {run_dir} belongs to another run (its {IDENTITY_FILE} differs from this job's "
                f"config); move it away, or pass another run_name"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def other_runs(storage: Path, name: str, folder: str) -> list[Path]:
    """Run folders under ``storage`` of the same ``name`` with another identity (to tell the user about them)."""
    found = []
    for path in sorted(storage.glob(f"{name}-*/{IDENTITY_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("name") == name and path.parent.name != folder:
            found.append(path.parent)
    return found
