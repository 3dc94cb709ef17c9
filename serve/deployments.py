"""The Ray Serve deployments: ``Router`` -> one ``Retriever`` per domain -> ``Reader``, behind the FastAPI ``Ingress``.

Each deployment is a thin shell around :mod:`medrag_ray.serving` and batches concurrent requests with
``serve.batch`` (one router forward, one FAISS search per retrieval setting, one reader pass per batch).

**One Retriever deployment per domain, not one multiplexed deployment.** A domain's replica holds that domain's
FAISS indexes and document store in memory (for MIMIC-CXR-sized corpora, GiBs, and on GPU with FAISS GPU);
model multiplexing loads models on demand into an LRU cache, which would reload an index on every cache miss.
With a deployment per domain each domain autoscales on its own traffic (a radiology-heavy hospital adds
radiology replicas only) and a replica never holds an index it does not serve.

Errors a request causes (an InputError from the core) are returned as values, not raised, so they cross the
deployment boundary intact and one bad request never fails the rest of its batch.
"""


import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from medrag_ray.config import DeploymentSettings, ServeConfig
from medrag_ray.serving.images import InputError, decode_image
from medrag_ray.serving.query import AnswerQuery, parse_query
from serve.request_body import parse_body, read_capped
from serve.schemas import AnswerRequest, AnswerResponse, ErrorResponse, Health

logger = logging.getLogger("serve.deployments")

API_VERSION = "1"

app = FastAPI(
    title="medrag-ray",
    version=API_VERSION,
    description="Domain router -> per-domain retrievers -> reader (MMed-RAG, MR-RAG IFA, JOMED logit fusion).",
)


def _device(cfg: ServeConfig, settings: DeploymentSettings) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if settings.num_gpus > 0 else "cpu"


def _decode(cfg: ServeConfig, data: bytes) -> Any:
    return decode_image(data, max_bytes=cfg.limits.max_image_bytes, max_pixels=cfg.limits.max_image_pixels)


def _on_decodable(cfg: ServeConfig, images: list[bytes],
                  run: Callable[[list[int], list[Any]], list[Any]]) -> list[Any]:
    """``run(positions, decoded images)`` on the images of a batch that decode; the others' slots hold their
    InputError, so one bad image never fails the rest of the batch."""
    out: list[Any] = [None] * len(images)
    ok, decoded = [], []
    for i, data in enumerate(images):
        try:
            decoded.append(_decode(cfg, data))
            ok.append(i)
        except InputError as exc:
            out[i] = exc
    if ok:
        for i, result in zip(ok, run(ok, decoded), strict=True):
            out[i] = result
    return out


def _check_device(device: Any) -> None:
    """Serve's periodic health check: a replica whose CUDA context has failed raises here and is replaced."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def _configure_batch(method: Any, settings: DeploymentSettings) -> None:
    method.set_max_batch_size(settings.max_batch_size)
    method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)


@serve.deployment
class Router:
    """F(x_v): the domain router, restricted to the indexed domains."""

    def __init__(self, cfg: ServeConfig, domains: list[str]) -> None:
        from medrag_ray.models.router import load_router

        self.cfg = cfg
        self.domains = tuple(domains)
        self.router = load_router(cfg.resolved_router_dir, device=_device(cfg, cfg.router))
        _configure_batch(self._route, cfg.router)

    async def route(self, image: bytes) -> tuple[str, float] | InputError:
        return await self._route(image)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _route(self, images: list[bytes]) -> list[tuple[str, float] | InputError]:
        from medrag_ray.retrieval.retriever import route_images

        return _on_decodable(self.cfg, images, lambda _, decoded: route_images(
            self.router, decoded, self.domains, len(decoded)))

    def info(self) -> dict[str, Any]:
        return {"router_dir": str(self.cfg.resolved_router_dir), "domains": list(self.domains)}

    def check_health(self) -> None:
        _check_device(self.router.device)


@serve.deployment
class Retriever:
    """One domain's retrieval: top-k + adaptive-k (concat) or JOMED's candidates with p_R (jomed)."""

    def __init__(self, cfg: ServeConfig, domain: str) -> None:
        from medrag_ray.serving.answer import EvidenceRetriever

        self.cfg = cfg
        self.domain = domain
        self.evidence = EvidenceRetriever.from_config(cfg, domains=[domain], device=_device(cfg, cfg.retriever))
        _configure_batch(self._retrieve, cfg.retriever)

    async def retrieve(self, image: bytes, query: AnswerQuery, confidence: float | None) -> Any:
        return await self._retrieve((image, query, confidence))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _retrieve(self, items: list[tuple[bytes, AnswerQuery, float | None]]) -> list[Any]:
        return _on_decodable(self.cfg, [data for data, _, _ in items], lambda ok, decoded: self.evidence.retrieve(
            decoded, [items[i][1] for i in ok], [(self.domain, items[i][2]) for i in ok]))

    def info(self) -> dict[str, Any]:
        return {"domain": self.domain, "jomed": self.evidence.jomed is not None}

    def check_health(self) -> None:
        res = self.evidence.retriever.resources(self.domain)
        if len(res.text_index) == 0:
            raise RuntimeError(f"the {self.domain} index holds no documents")
        _check_device(res.retriever.device)


@serve.deployment
class Reader:
    """The reader M: closed scoring (with consistency and JOMED fusion), open answers and reports, IFA."""

    def __init__(self, cfg: ServeConfig) -> None:
        from medrag_ray.models.reader import load_reader
        from medrag_ray.reader.engine import ReaderEngine
        from medrag_ray.serving.answer import ifa_settings

        self.cfg = cfg
        model, processor = load_reader(cfg.resolved_reader_dir, device=_device(cfg, cfg.reader))
        self.ifa = ifa_settings(cfg, model)
        self.engine = ReaderEngine(model, processor, batch_size=cfg.reader.max_batch_size)
        _configure_batch(self._read, cfg.reader)

    async def read(self, image: bytes, query: AnswerQuery, retrieved: Any) -> Any:
        from medrag_ray.serving.answer import plan_read

        try:
            plan = plan_read(query, _decode(self.cfg, image), retrieved, self.cfg.style, self.cfg.consistency)
        except InputError as exc:
            return exc
        return await self._read(plan)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _read(self, plans: list[Any]) -> list[Any]:
        from medrag_ray.serving.answer import read_plans

        return read_plans(self.engine, plans, self.ifa)

    def info(self) -> dict[str, Any]:
        layers = list(self.ifa.layers) if self.ifa is not None else []
        return {"reader_dir": str(self.cfg.resolved_reader_dir), "ifa_layers": layers}

    def check_health(self) -> None:
        _check_device(self.engine.device)


def _error(exc: InputError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": exc.to_dict()})


def _unwrap(result: Any) -> Any:
    if isinstance(result, InputError):
        raise result
    return result


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503, 504)
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": AnswerRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        **{k: v for k, v in AnswerRequest.model_json_schema()["properties"].items()
                           if k != "image_base64"},
                    },
                }
            },
        },
    }
}


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP: ``POST /v1/answer``, ``GET /healthz`` (and FastAPI's ``/openapi.json``, ``/docs``)."""

    def __init__(self, cfg: ServeConfig, domains: list[str], router: DeploymentHandle,
                 retrievers: dict[str, DeploymentHandle], reader: DeploymentHandle) -> None:
        self.cfg = cfg
        self.domains = tuple(domains)
        self.router = router
        self.retrievers = retrievers
        self.reader = reader

    async def _call(self, response: Any) -> Any:
        return _unwrap(await asyncio.wait_for(response, timeout=self.cfg.request_timeout_s))

    @app.post("/v1/answer", response_model=AnswerResponse, responses=_ERRORS, openapi_extra=_BODY)
    async def answer(self, request: Request) -> JSONResponse:
        """Route the image, retrieve from its domain's index and answer (see ``AnswerRequest``)."""
        from medrag_ray.data.schema import UNKNOWN_DOMAIN
        from medrag_ray.serving.answer import ReaderAnswer, Retrieved, response_body, unknown_domain

        t0 = time.perf_counter()
        try:
            body = await read_capped(request.headers, request.stream(), self.cfg.limits.max_body_bytes)
            parsed = await parse_body(request.headers.get("content-type"), body, self.cfg.limits)
            query = parse_query(parsed.fields, self.cfg.limits, self.domains)
            decode_image(parsed.image, max_bytes=self.cfg.limits.max_image_bytes,
                         max_pixels=self.cfg.limits.max_image_pixels, content_type=parsed.image_content_type)
            t1 = time.perf_counter()
            if query.domain is None:
                domain, confidence = await self._call(self.router.route.remote(parsed.image))
            else:
                domain, confidence = query.domain, None
            t2 = time.perf_counter()
            if domain == UNKNOWN_DOMAIN:  # no index fits the image: answer from the image alone
                retrieved: Retrieved = unknown_domain(confidence)
            else:
                retrieved = await self._call(self.retrievers[domain].retrieve.remote(parsed.image, query, confidence))
            t3 = time.perf_counter()
            answer: ReaderAnswer = await self._call(self.reader.read.remote(parsed.image, query, retrieved))
            t4 = time.perf_counter()
        except InputError as exc:
            return _error(exc)
        except BackPressureError:
            return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={"detail": {
                "status": 503, "field": "server", "message": "overloaded: every replica's queue is full; retry later"}})
        except asyncio.TimeoutError:
            return JSONResponse(status_code=504, content={"detail": {
                "status": 504, "field": "server", "message": f"no answer within {self.cfg.request_timeout_s} s"}})
        timings = {"validate": (t1 - t0) * 1e3, "route": (t2 - t1) * 1e3, "retrieve": (t3 - t2) * 1e3,
                   "read": (t4 - t3) * 1e3}
        return JSONResponse(response_body(query, retrieved, answer, str(self.cfg.resolved_reader_dir), timings))

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> JSONResponse:
        """Every downstream deployment answers ``info`` within 5 s: 200, else 503 naming the one that did not."""
        handles = {"router": self.router, "reader": self.reader,
                   **{f"retriever_{d}": h for d, h in self.retrievers.items()}}
        states: dict[str, str] = {}
        for name, handle in handles.items():
            try:
                await asyncio.wait_for(handle.info.remote(), timeout=5.0)
                states[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means this deployment is not serving
                states[name] = f"unavailable: {type(exc).__name__}"
        ok = all(s == "ok" for s in states.values())
        body = {"status": "ok" if ok else "degraded", "domains": list(self.domains), "deployments": states}
        return JSONResponse(status_code=200 if ok else 503, content=body)
