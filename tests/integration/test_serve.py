"""The Serve application on local Ray over HTTP: real images from ../shared/data, a malformed-input sweep with
zero 5xx, and overload shed as 503 while the app keeps serving."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.retrieval.embed import read_docs_table
from serve.app import DEFAULT_CONFIG, config_from_serve_file
from tests.conftest import REPO_ROOT, require
from tests.integration.conftest import PYTHON, free_ports, stop_group, user_env, wait_http
from tests.unit.serve.test_request_body import multipart
from tests.unit.serving.test_images import png_declaring

pytestmark = pytest.mark.slow


def overrides(root: Path, port: int) -> list[str]:
    """``python serve/app.py`` overrides of the shipped ``serve/config.yaml``: one replica each, small batches,
    and one ingress slot with a queue of 2, so a burst of concurrent requests must be shed with 503s."""
    out = [f"artifacts_dir={root}", f"port={port}", "request_timeout_s=60", "ray.num_cpus=4"]
    small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25, "max_batch_size": 4, "max_ongoing_requests": 8,
             "max_queued_requests": 16}
    one_slot = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1, "max_batch_size": 1, "max_ongoing_requests": 1,
                "max_queued_requests": 2}
    for name, settings in (("router", small), ("retriever", small), ("reader", small), ("ingress", one_slot)):
        out += [f"{name}.{key}={value}" for key, value in settings.items()]
    return out


@pytest.fixture(scope="module")
def served(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The app as the README starts it: ``python serve/app.py [overrides]`` from a clean working directory, until
    /healthz answers; teardown is SIGTERM (what ``kill`` and process managers send; Ctrl-C takes the same exit),
after which the script must shut Serve down and exit with status 0."""
    root, (port,) = tiny_artifacts, free_ports(1)
    cwd = tmp_path_factory.mktemp("serve_cwd")
    with user_env() as env:
        proc = subprocess.Popen([PYTHON, str(REPO_ROOT / "serve" / "app.py"), *overrides(root, port)], cwd=cwd,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=300)
            except TimeoutError:
                stop_group(proc.pid)
                pytest.fail(f"serve/app.py never answered /healthz:\n{proc.communicate()[0][-8000:]}")
            yield f"http://127.0.0.1:{port}", root
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=90)
            assert proc.returncode == 0, out[-6000:]
            assert "stopping: shutting medrag down" in out
        finally:
            stop_group(proc.pid)


def post(url: str, **kwargs: Any) -> requests.Response:
    return requests.post(url + "/v1/answer", timeout=120, **kwargs)


def upload(url: str, image: bytes, fields: dict[str, Any], content_type: str = "image/jpeg") -> requests.Response:
    return post(url, files={"image": ("image", image, content_type)}, data=fields)


def check_answer(body: dict[str, Any], root: Path, task: str = "closed") -> None:
    assert body["task"] == task and body["domain"] in ("pathology", "radiology")
    indexed = set(read_docs_table(root / "index", body["domain"]).column("id").to_pylist())
    ids = [e["id"] for e in body["evidence"]]
    assert ids and set(ids) <= indexed, "every evidence id is a document of the routed domain's index"
    kept = [e["kept"] for e in body["evidence"]]
    assert body["k_kept"] == sum(kept) and kept == sorted(kept, reverse=True), "adaptive-k keeps a prefix"
    scores = [e["score"] for e in body["evidence"]]
    assert scores == sorted(scores, reverse=True)
    if task == "closed":
        probs = body["probabilities"]
        assert set(probs) == {"yes", "no"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert body["answer"] == max(probs, key=probs.get)
        assert len(body["consistency"]["candidate_answers"]) == body["k_kept"]
    assert 0.0 < body["domain_confidence"] <= 1.0


def test_health_and_openapi(served: tuple[str, Path]) -> None:
    url, _ = served
    health = requests.get(url + "/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json()["deployments"] == {"router": "ok", "reader": "ok", "retriever_pathology": "ok",
                                            "retriever_radiology": "ok"}
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/answer"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "AnswerResponse" in json.dumps(schema["paths"]["/v1/answer"]["post"]["responses"]["200"])


def test_real_images_over_http(served: tuple[str, Path], shared_data: Path) -> None:
    url, root = served
    vqa = json.loads(require(shared_data, "vqa_rad", "testset.json").read_text())
    closed = [r for r in vqa if r["answer_type"] == "CLOSED"][:3]
    for row in closed:
        image = require(shared_data, "vqa_rad", "images", row["image_name"]).read_bytes()
        r = upload(url, image, {"question": row["question"]})
        assert r.status_code == 200, r.text
        check_answer(r.json(), root)
    path_image = next(iter(sorted(require(shared_data, "pathvqa", "images").glob("*.jpg")))).read_bytes()
    as_json = post(url, json={"image_base64": base64.b64encode(path_image).decode(), "question": "Is this necrosis?",
                              "fusion": "jomed", "k": 3})
    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    check_answer(body, root)
    assert body["fusion"] == "jomed" and body["k_kept"] == 3
    assert sum(e["weight"] for e in body["evidence"]) == pytest.approx(1.0, abs=1e-4)
    png = next(iter(sorted(require(shared_data, "medpix2", "images").glob("*.png")))).read_bytes()
    report = upload(url, png, {"task": "report", "max_new_tokens": "6", "domain": "radiology"}, "image/png")
    assert report.status_code == 200, report.text
    assert report.json()["domain"] == "radiology" and report.json()["domain_confidence"] is None


def _jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_malformed_input_sweep_has_zero_5xx(served: tuple[str, Path]) -> None:
    url, root = served
    good = _jpeg()
    q = {"question": "Is there an effusion?"}
    cases: dict[str, requests.Response] = {
        "truncated_jpeg": upload(url, good[: len(good) // 3], q),
        "png_bomb": upload(url, png_declaring(40_000, 40_000), q, "image/png"),
        "wrong_part_content_type": upload(url, good, q, "application/pdf"),
        "declared_png_is_jpeg": upload(url, good, q, "image/png"),
        "text_as_image": upload(url, b"hello, I am not an image", q, "image/jpeg"),
        "body_50mb": post(url, data=b"\0" * (50 * 2**20), headers={"content-type": "multipart/form-data; boundary=x"}),
        "wrong_request_content_type": post(url, data=good, headers={"content-type": "image/jpeg"}),
        "unicode_junk_question": upload(url, good, {"question": "\u202e\u0000\ufffe" + "\U0010ffff" * 3}),
        "invalid_utf8_json": post(url, data=b'{"question": "\xff\xfe"}', headers={"content-type": "application/json"}),
        "lone_surrogate_json": post(url, data=b'{"image_base64": "' + base64.b64encode(good) + b'", "question": '
                                    b'"\\ud800?"}', headers={"content-type": "application/json"}),
        "empty_question": upload(url, good, {"question": "   "}),
        "huge_question": upload(url, good, {"question": "why " * 5000}),
        "unknown_task": upload(url, good, {**q, "task": "segment"}),
        "k_zero": upload(url, good, {**q, "k": "0"}),
        "bad_base64": post(url, json={"image_base64": "%%%", **q}),
        "server_path_instead_of_bytes": post(url, json={"image": "/etc/passwd", **q}),
        "empty_body": post(url, data=b"", headers={"content-type": "application/json"}),
        "garbage_multipart": post(url, data=b"--x\r\nnope",
                                  headers={"content-type": "multipart/form-data; boundary=x"}),
        "prompt_too_long": upload(url, good, {**q, "k": "20", "adaptive": "none"}),
    }
    statuses = {name: r.status_code for name, r in cases.items()}
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    for name, r in cases.items():
        detail = r.json()["detail"]
        assert detail["field"] and detail["message"], (name, detail)
    assert statuses["png_bomb"] == 413 and statuses["body_50mb"] == 413
    assert statuses["wrong_part_content_type"] == 415 and statuses["wrong_request_content_type"] == 415
    assert statuses["truncated_jpeg"] == 400
    assert cases["prompt_too_long"].json()["detail"]["field"] == "k"
    after = upload(url, good, q)
    assert after.status_code == 200, "the app keeps serving after the sweep"
    check_answer(after.json(), root)


def test_overload_is_shed_with_503_and_the_app_recovers(served: tuple[str, Path]) -> None:
    url, root = served
    good = _jpeg()

    def one(_: int) -> int:
        return upload(url, good, {"question": "Is there an effusion?"}).status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        codes = list(pool.map(one, range(48)))
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) > 0, codes
    assert requests.get(url + "/healthz", timeout=30).status_code == 200
    assert upload(url, good, {"question": "Is there an effusion?"}).status_code == 200


def test_synthetic_closed_questions_match_the_one_process_answerer(served: tuple[str, Path]) -> None:
    from medrag_ray.serving.answer import LocalAnswerer

    url, root = served
    local = LocalAnswerer(config_from_serve_file(DEFAULT_CONFIG, overrides(root, 8000)))  # what the server runs
    samples = [s for s in read_parquet(root / "data" / "synthetic" / "samples_test.parquet", Sample)
               if s.answer_type == "closed"][:4]
    for s in samples:
        served_body = upload(url, s.image_bytes, {"question": s.question}, "image/png").json()
        [expected] = local.answer([(s.image_bytes, {"question": s.question})])
        assert served_body["answer"] == expected["answer"] and served_body["domain"] == expected["domain"]
        assert [e["id"] for e in served_body["evidence"]] == [e["id"] for e in expected["evidence"]]
        assert served_body["probabilities"]["yes"] == pytest.approx(expected["probabilities"]["yes"], abs=1e-4)
        assert served_body["consistency"] == expected["consistency"]


def test_multipart_helper_round_trips(served: tuple[str, Path]) -> None:
    url, _ = served
    body = multipart({"question": "Is it?"}, _jpeg(), content_type="image/jpeg")
    r = post(url, data=body, headers={"content-type": "multipart/form-data; boundary=medragboundary"})
    assert r.status_code == 200, r.text
