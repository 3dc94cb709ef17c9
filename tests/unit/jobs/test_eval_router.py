"""jobs/eval_router.py end to end with the untrained init router on a tiny four-domain dataset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from jobs.eval_router import main, parse_args, result_stem
from medrag_ray.config import ConfigError, EvalRouterConfig
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.models.router import load_router
from tests.unit.jobs.eval_fixtures import init_model_dir, tiny_synthetic


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model_dir("router", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    domains = ("radiology", "ophthalmology", "pathology", "dermatology")
    return tiny_synthetic(tmp_path_factory.mktemp("d") / "tinyroute", domains, n_per_domain=20, reports_only=True)


def test_defaults_and_validation() -> None:
    assert parse_args([]) == EvalRouterConfig()
    assert result_stem(EvalRouterConfig(dataset_dir="x/routing_real")) == "router_routing_real"
    assert result_stem(EvalRouterConfig(dataset_dir="x/routing_real", split="val")) == "router_routing_real_val"
    with pytest.raises(ConfigError, match="split"):
        parse_args(["split=dev"])


def test_main_counts_match_the_dataset(router_dir: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = main(parse_args([f"router_dir={router_dir}", f"dataset_dir={dataset}", "device=cpu", f"out_dir={out}",
                              "batch_size=7"]))  # fmt: skip
    rows = read_parquet(dataset / "samples_test.parquet", Sample)
    router = load_router(router_dir)
    known = [s for s in rows if s.domain in router.domains]
    by_domain = Counter(s.domain for s in rows)
    assert result["router_domains"] == list(router.domains) and "dermatology" not in router.domains
    assert result["n_total"] == len(rows) and result["n_evaluated"] == len(known)
    assert result["n_unknown_domain"] == by_domain["dermatology"] > 0
    assert result["unknown_domains"]["dermatology"]["n"] == by_domain["dermatology"]
    rep = result["report"]
    assert {d: m["support"] for d, m in rep["per_class"].items()} == {d: by_domain[d] for d in router.domains}
    assert sum(map(sum, rep["confusion"]["rows_truth_cols_predicted"])) == len(known)
    predicted = [d for d, _ in router.predict([load_image(s.image_bytes) for s in known])]
    expected_acc = sum(p == s.domain for p, s in zip(predicted, known, strict=True)) / len(known)
    assert result["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert result["per_source"]["synthetic"]["n"] == len(rows)
    assert result["per_source"]["synthetic"]["n_known_domain"] == len(known)
    assert result["split"] == "test" and result["n_without_image"] == 0

    written = json.loads((out / "router_tinyroute.json").read_text())
    assert written == json.loads(json.dumps(result))
    md = (out / "router_tinyroute.md").read_text()
    assert "Confusion (rows: truth, columns: predicted)" in md and "'dermatology'" in md

    val = main(parse_args([f"router_dir={router_dir}", f"dataset_dir={dataset}", "split=val", "device=cpu",
                           f"out_dir={out}"]))  # fmt: skip
    assert val["n_total"] == len(read_parquet(dataset / "samples_val.parquet", Sample))
    assert (out / "router_tinyroute_val.json").is_file()


def test_missing_dataset_names_the_job(router_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make_routing_data.py"):
        main(parse_args([f"router_dir={router_dir}", f"dataset_dir={tmp_path}", "device=cpu"]))
