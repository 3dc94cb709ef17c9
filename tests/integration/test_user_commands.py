"""The README's commands as a user types them: subprocesses started from a clean working directory that holds
nothing but ``artifacts/`` (pieces of the tiny pipeline's, copied or linked), with this venv's ``python``.

* ``python jobs/mine_prefs.py`` with the index missing builds what is missing of the pipeline steps before
  mining (here: ``build_index``), then mines; nothing after mining runs.
* The README's "fine-tune the router on real images" pair after a pipeline run: a new run beside the pipeline's
  router run (which is left untouched), not a resume of a checkpoint of another shape.

Each command runs in its own process group with a private Ray temp dir (:func:`~tests.integration.conftest.user_env`),
so teardown stops exactly what the command started. ``python serve/app.py`` is run this way by the ``served``
fixture of ``tests/integration/test_serve.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medrag_ray.config import steps_before
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.data.subset import take_spread
from tests.conftest import REPO_ROOT
from tests.integration.conftest import PYTHON, run_command, user_env

pytestmark = pytest.mark.slow


def copy_artifacts(src: Path, dst: Path, parts: list[str]) -> None:
    for part in parts:
        shutil.copytree(src / part, dst / part, symlinks=True)


def test_mine_prefs_builds_only_the_steps_before_mining(built, tmp_path: Path) -> None:  # noqa: ANN001
    """The index is missing (the cheapest prerequisite to rebuild here), so are the pairs and everything after:
    the job builds the index with the pipeline's own step, skips the steps whose outputs exist, and mines."""
    root, _ = built
    art = tmp_path / "artifacts"
    copy_artifacts(root, art, ["data/synthetic", "data/reader_pretrain", "models/init", "models/router",
                               "models/retriever", "models/reader_vision", "models/reader_base", "models/reader"])
    with user_env() as env:
        res = run_command([PYTHON, str(REPO_ROOT / "jobs" / "mine_prefs.py"), "limit=24"], tmp_path, env,
                          timeout_s=900)
    log = res.stdout
    assert res.returncode == 0, log[-8000:]
    assert "building the prerequisites with the pipeline" in log
    assert "step build_index: building" in log
    for step in steps_before("mine_prefs"):
        assert step == "build_index" or f"step {step}: found" in log, step
    assert "step mine_prefs" not in log and "step train_dpo" not in log
    manifest = json.loads((art / "index" / "manifest.json").read_text())
    assert sorted(manifest["domains"]) == ["pathology", "radiology"]
    assert not (art / "models" / "reader_dpo").exists() and not (art / "eval").exists()
    summary = json.loads((art / "prefs" / "summary.json").read_text())
    train = read_parquet(art / "data" / "synthetic" / "samples_train.parquet", Sample)
    samples = take_spread(train, [s.domain for s in train], 24)
    assert summary["samples_mined"] == sum(s.answer_type == "closed" for s in samples)
    assert summary["this_run"]["samples"] == 24


def test_router_on_real_images_after_the_pipeline(built, shared_data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """README: `python jobs/make_routing_data.py`, then `python jobs/train_router.py dataset_dir=artifacts/data/
    routing_real out_dir=artifacts/models/router_real` in a checkout where the pipeline already trained its router
    (run_name `router` too). Smaller sample caps and one epoch keep it short; the code path is the README's."""
    root, _ = built
    art = tmp_path / "artifacts"
    copy_artifacts(root, art, ["models/init"])
    (art / "ray_train").mkdir()
    [pipeline_run] = [p for p in (root / "ray_train").glob("router-*") if p.is_dir()]
    (art / "ray_train" / pipeline_run.name).symlink_to(pipeline_run, target_is_directory=True)
    before = sorted(p.name for p in pipeline_run.iterdir())
    with user_env() as env:
        # shared_dir="" finds the data as the `shared_data` fixture did ($MEDRAG_SHARED_DATA or ../shared/data)
        res = run_command([PYTHON, str(REPO_ROOT / "jobs" / "make_routing_data.py"),
                           "data.max_per_source_split=40"], tmp_path, env, timeout_s=300)
        assert res.returncode == 0, res.stdout[-6000:]
        res = run_command([PYTHON, str(REPO_ROOT / "jobs" / "train_router.py"),
                           "dataset_dir=artifacts/data/routing_real", "out_dir=artifacts/models/router_real",
                           "train.epochs=1"], tmp_path, env, timeout_s=600)
    log = res.stdout
    assert res.returncode == 0, log[-8000:]
    assert "trained with another config and are left as they are" in log and pipeline_run.name in log
    metrics = json.loads((art / "models" / "router_real" / "metrics.json").read_text())
    real_domains = sorted(set(pq.read_table(art / "data" / "routing_real" / "samples_train.parquet",
                                            columns=["domain"]).column("domain").to_pylist()))
    assert metrics["domains"] == real_domains and len(real_domains) > 2  # the pipeline's router has 2
    assert sorted(p.name for p in pipeline_run.iterdir()) == before  # the pipeline's run is untouched
    [new_run] = [p for p in (art / "ray_train").glob("router-*") if p.name != pipeline_run.name]
    assert list(new_run.glob("checkpoint_*"))
