"""The REST app: routes translate HTTP to DataPlane calls and back, nothing more."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from ember.server import triton_metrics
from ember.server.codecs import v2
from ember.server.dataplane import DataPlane
from ember.server.errors import EmberError, InvalidInput, Unimplemented
from ember.server.metadata import EXTENSIONS, SERVER_NAME, SERVER_VERSION
from ember.server.rest import openapi
from ember.server.rest.errors import ember_error_response, error_response
from ember.server.rest.front import InferFront
from ember.server.rest.infer import InferEndpoints

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, option=_JSON_OPTIONS), status, media_type="application/json")


def build_app(dataplane: DataPlane, *, max_body_bytes: int = 64 * 1024 * 1024) -> InferFront:
    """The whole REST surface: the inference endpoints in front, FastAPI behind for the rest."""
    app = build_routes(dataplane)
    return InferFront(app, InferEndpoints(dataplane), max_body_bytes)


def build_routes(dataplane: DataPlane) -> FastAPI:
    app = FastAPI(
        title="Ember predictor", version=SERVER_VERSION, docs_url=None, redoc_url=None,
        # FastAPI's OpenTelemetry hooks look up providers on every request; Ember has metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )  # fmt: skip
    repository = dataplane.repository

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
        return _json(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        )

    # --- KServe V1 ----------------------------------------------------------------------
    @app.get("/v1/models")
    async def v1_models() -> Response:
        return _json({"models": repository.names()})

    @app.get("/v1/models/{model_name}")
    async def v1_model(model_name: str) -> Response:
        return _json({"name": model_name, "ready": dataplane.model_ready(model_name)})

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

    # Specific routes before the catch-all model routes.
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/config", model_config, methods=["GET"])
        app.add_api_route(prefix + "/stats", model_stats, methods=["GET"])
        app.add_api_route(prefix, model_metadata, methods=["GET"])

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

    # Documented for OpenAPI readers; served by InferFront before these are ever reached.
    async def routed_elsewhere() -> Response:  # pragma: no cover
        raise AssertionError("inference is answered by InferFront")

    for path in (
        "/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{version}/infer",
        "/v1/models/{model_name}:predict",
    ):  # fmt: skip
        app.add_api_route(path, routed_elsewhere, methods=["POST"])
    openapi.install(app)
    return app
