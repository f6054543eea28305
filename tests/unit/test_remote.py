"""`ember transformer`'s predictor client: its flags, and what each predictor answer becomes,
against a real (in-process aiohttp) V1 predictor."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from ember.server.cli import _parser
from ember.server.config import ModelConfig, load_model_config
from ember.server.errors import (
    DeadlineExceeded,
    EmberError,
    InvalidInput,
    ModelFailed,
    Overloaded,
    PredictorUnavailable,
)
from ember.transformers.remote import RemotePredictor, _error, _v1_body
from ember.transformers.settings import PredictorSettings, predictor_from

ROOT = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["transformer", *argv])


def test_kserve_transformer_arguments_parse() -> None:
    args = _args(
        "--model_name", "minilm", "--predictor_host", "minilm-predictor.default",
        "--http_port", "8080", "--predictor_use_ssl", "--predictor_request_timeout_seconds", "5",
    )  # fmt: skip
    settings = predictor_from(args, {})
    assert settings == PredictorSettings("minilm-predictor.default", "v1", True, 5.0)
    assert predictor_from(_args("--predictor_host", "h:1"), {"PROTOCOL": "v2"}).protocol == "v2"
    explicit = _args("--predictor_host", "h:1", "--predictor_protocol", "grpc-v2")
    assert predictor_from(explicit, {"PROTOCOL": "v2"}).protocol == "grpc-v2"
    assert _args("--predictor_host", "h", "--predictor_use_ssl", "false").predictor_use_ssl is False
    assert _args("--predictor_host", "http://h:80").predictor_host == "h:80"


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --predictor_host is required
        ["--predictor_host", "h", "--predictor_protocol", "v3"],
        ["--predictor_host", "h/path"],
    ],
)
def test_bad_transformer_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)


def test_an_unknown_protocol_in_the_environment_is_refused() -> None:
    with pytest.raises(ValueError, match="PROTOCOL='v9'"):
        predictor_from(_args("--predictor_host", "h"), {"PROTOCOL": "v9"})


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("400", InvalidInput), ("429", Overloaded), ("503", PredictorUnavailable),
        ("504", DeadlineExceeded), ("404", ModelFailed), ("500", ModelFailed), (None, ModelFailed),
        ("StatusCode.INVALID_ARGUMENT", InvalidInput),
        ("StatusCode.RESOURCE_EXHAUSTED", Overloaded),
        ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceeded),
        ("StatusCode.INTERNAL", ModelFailed),
    ],
)  # fmt: skip
def test_predictor_statuses_become_the_same_typed_errors(
    status: str | None, kind: type[EmberError]
) -> None:
    error = _error(status, "told so", "predictor p")
    assert type(error) is kind
    assert "told so" in error.message


def test_v1_bodies_name_inputs_only_when_there_are_several() -> None:
    one = {"x": np.array([[1.0, 2.0]])}
    assert _v1_body(one)["instances"] is one["x"]
    two = {"a": np.array([[1], [2]]), "b": np.array([[3], [4]])}
    rows = _v1_body(two)["instances"]
    assert [(r["a"].tolist(), r["b"].tolist()) for r in rows] == [([1], [3]), ([2], [4])]


# --- against a V1 predictor ------------------------------------------------------------------
ANSWERS: dict[str, tuple[int, Any]] = {
    "ok": (200, {"predictions": [[1.0, 2.0]]}),
    "full": (429, {"error": "queue full"}),
    "bad": (400, {"error": "input 'x' is wrong"}),
    "broken": (500, {"error": "boom"}),
    "shapeless": (200, {"nothing": 1}),
    "html": (502, "<html>bad gateway</html>"),
}


@pytest.fixture
async def predictor(unused_tcp_port: int) -> AsyncIterator[str]:
    async def predict(request: web.Request) -> web.StreamResponse:
        seen = await request.json()
        assert "instances" in seen
        status, body = ANSWERS[request.match_info["mode"]]
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/v1/models/{mode}:predict", predict)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    yield f"127.0.0.1:{unused_tcp_port}"
    await runner.cleanup()


def _config(name: str) -> ModelConfig:
    base = load_model_config(ROOT / "models" / "mlp")
    return base.model_copy(update={"name": name, "pipeline": None})


@pytest.mark.parametrize(
    ("mode", "kind", "fragment"),
    [
        ("full", Overloaded, "queue full"),
        ("bad", InvalidInput, "input 'x' is wrong"),
        ("broken", ModelFailed, "boom"),
        ("shapeless", ModelFailed, "without 'predictions'"),
        ("html", ModelFailed, "502, not JSON"),
    ],
)
async def test_v1_predictor_answers(
    predictor: str, mode: str, kind: type[EmberError], fragment: str
) -> None:
    model = await RemotePredictor(PredictorSettings(predictor, "v1")).attach(_config(mode))
    try:
        with pytest.raises(kind, match=fragment):
            await model.submit({"input": np.zeros((1, 784), np.float32)})
    finally:
        await model.close()


async def test_v1_predictor_success_and_deadline(predictor: str) -> None:
    model = await RemotePredictor(PredictorSettings(predictor, "v1")).attach(_config("ok"))
    try:
        result = await model.submit({"input": np.zeros((1, 784), np.float32)})
        assert result.outputs["output"].dtype == np.float32
        assert result.outputs["output"].tolist() == [[1.0, 2.0]]
        with pytest.raises(DeadlineExceeded):
            await model.submit({"input": np.zeros((1, 784), np.float32)}, deadline=0.0)
        assert len(model) == 0
    finally:
        await model.close()
