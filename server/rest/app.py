"""The REST app: routes translate HTTP to DataPlane calls and back, nothing more."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ember.server import triton_metrics
from ember.server.codecs import v1, v2
from ember.server.dataplane import DataPlane
from ember.server.errors import EmberError, InvalidInput, Unimplemented
from ember.server.request import InferRequest, InferResponse
from ember.server.rest.body import BINARY_HEADER, parse_json, read_body, split_binary_body
from ember.server.rest.errors import ember_error_response, error_response

SERVER_NAME = "ember"
SERVER_VERSION = "0.1.0"
EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, option=_JSON_OPTIONS), status, media_type="application/json")


def build_app(dataplane: DataPlane, *, max_body_bytes: int = 64 * 1024 * 1024) -> FastAPI:
    app = FastAPI(
        title="Ember predictor", version=SERVER_VERSION, docs_url=None, redoc_url=None,
        # FastAPI's OpenTelemetry hooks look up providers on every request; Ember has metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )  # fmt: skip
    repository = dataplane.repository

    async def decode_and_infer(
        model_name: str, protocol: str, decode: Callable[[], Awaitable[InferRequest]]
    ) -> tuple[InferRequest, InferResponse]:
        try:
            request = await decode()
        except EmberError as exc:
            dataplane.reject(model_name, protocol, exc)
            raise
        return request, await dataplane.infer(request, protocol)

    # --- server level -------------------------------------------------------------------
    @app.get("/")
    async def root() -> Response:
        return _json({"status": "alive"})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = (
            generate_latest(dataplane.metrics.registry)
            + triton_metrics.render(repository.handles()).encode()
        )
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if dataplane.ready():
            return _json({"ready": True})
        reason = "server is draining" if dataplane.draining else "models are not ready"
        return error_response(503, reason)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    # --- KServe V1 ----------------------------------------------------------------------
    @app.get("/v1/models")
    async def v1_models() -> Response:
        return _json({"models": repository.names()})

    @app.get("/v1/models/{model_name}")
    async def v1_model(model_name: str) -> Response:
        return _json({"name": model_name, "ready": dataplane.model_ready(model_name)})

    async def v1_predict(request: Request) -> Response:
        model_name = request.path_params["model_name"]

        async def decode() -> InferRequest:
            config = dataplane.model(model_name)
            return v1.decode_request(parse_json(await read_body(request, max_body_bytes)), config)

        _, response = await decode_and_infer(model_name, "v1", decode)
        return _json(v1.encode_response(response))

    @app.post("/v1/models/{model_name}:explain")
    async def v1_explain(model_name: str) -> Response:
        dataplane.model(model_name)
        raise Unimplemented(f"model '{model_name}' has no explainer")

    # --- Open Inference Protocol (V2) ----------------------------------------------------
    @app.get("/v2/models")
    async def v2_models() -> Response:
        return _json({"models": repository.names()})

    @app.post("/v2/repository/index")
    async def repository_index() -> Response:
        return _json(
            [
                {"name": h.name, "version": h.config.version, "state": h.state.value,
                 "reason": h.error or ""}
                for h in repository.handles()
            ]
        )  # fmt: skip

    @app.post("/v2/repository/models/{model_name}/load")
    async def repository_load(model_name: str) -> Response:
        try:
            await repository.load(model_name)
        except EmberError:
            raise
        except Exception as exc:
            return error_response(500, f"failed to load model '{model_name}': {exc}")
        return _json({"name": model_name, "load": True})

    @app.post("/v2/repository/models/{model_name}/unload")
    async def repository_unload(model_name: str) -> Response:
        await repository.unload(model_name)
        return _json({"name": model_name, "unload": True})

    async def model_ready(model_name: str, version: str | None = None) -> Response:
        ready = dataplane.model_ready(model_name, version)
        if ready:
            return _json({"name": model_name, "ready": True})
        return error_response(503, f"model '{model_name}' is not ready")

    async def model_config(model_name: str, version: str | None = None) -> Response:
        return _json(dataplane.model_config(model_name, version))

    async def model_stats(model_name: str, version: str | None = None) -> Response:
        return _json({"model_stats": dataplane.statistics(model_name, version)})

    @app.get("/v2/models/stats")
    async def all_stats() -> Response:
        return _json({"model_stats": dataplane.statistics()})

    async def model_metadata(model_name: str, version: str | None = None) -> Response:
        return _json(v2.model_metadata(dataplane.model(model_name, version)))

    async def model_infer(
        request: Request, model_name: str, version: str | None = None
    ) -> Response:
        async def decode() -> InferRequest:
            dataplane.model(model_name, version)  # an unknown model is a 404 before any 400
            body = await read_body(request, max_body_bytes)
            # tritonclient sends no Content-Type: binary requests are known by this header only.
            header_length = request.headers.get(BINARY_HEADER)
            if header_length is None:
                return v2.decode_request(parse_json(body), model_name, version)
            json_part, binary = split_binary_body(body, header_length)
            return v2.decode_request(parse_json(json_part), model_name, version, binary)

        infer_request, response = await decode_and_infer(model_name, "v2", decode)
        doc, blobs = v2.encode_response(response, v2.binary_outputs(infer_request))
        if not blobs:
            return _json(doc)
        header = orjson.dumps(doc, option=_JSON_OPTIONS)
        return Response(
            b"".join([header, *blobs]),
            media_type="application/octet-stream",
            headers={BINARY_HEADER: str(len(header))},
        )

    # Specific routes before the catch-all model routes.
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/config", model_config, methods=["GET"])
        app.add_api_route(prefix + "/stats", model_stats, methods=["GET"])
        app.add_api_route(prefix, model_metadata, methods=["GET"])

    # The inference routes are plain Starlette routes, matched first: FastAPI's dependency
    # solving and a walk past every other route cost ~70 µs a request (py-spy, ember bench),
    # a tenth of what the server adds to a batch-1 forward.
    async def v2_infer(request: Request) -> Response:
        params = request.path_params
        return await model_infer(request, params["model_name"], params.get("version"))

    app.router.routes[:0] = [
        Route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"]),
        Route("/v2/models/{model_name}/versions/{version}/infer", v2_infer, methods=["POST"]),
        Route("/v1/models/{model_name}:predict", v1_predict, methods=["POST"]),
    ]

    # Triton features Ember does not have: a clear 501 rather than a bare 404.
    async def unsupported(request: Request) -> Response:
        raise Unimplemented(f"{request.url.path} is not supported by Ember")

    for path in (
        "/v2/systemsharedmemory{rest:path}", "/v2/cudasharedmemory{rest:path}",
        "/v2/trace/setting", "/v2/models/{model_name}/trace/setting", "/v2/logging",
    ):  # fmt: skip
        app.add_api_route(path, unsupported, methods=["GET", "POST"], include_in_schema=False)

    # --- errors: every body is {"error": ...} ---------------------------------------------
    @app.exception_handler(EmberError)
    async def on_ember_error(_: Request, exc: EmberError) -> Response:
        return ember_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> Response:
        return ember_error_response(InvalidInput(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    return app
