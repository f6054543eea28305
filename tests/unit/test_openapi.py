"""The predictor's OpenAPI document says what the server does (tests/e2e/test_openapi.py
drives a real server with it)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.core.result import Ok

from ember.server.rest.errors import HTTP_STATUS


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


async def test_it_is_a_valid_openapi_document(document: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_dict(document)
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    assert len(results) == len(_operations(document)) > 0


async def test_no_422_and_errors_are_error_objects(document: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for method, path, operation in _operations(document):
        assert "422" not in operation["responses"], (method, path)
        for status, response in operation["responses"].items():
            if status != "200":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


async def test_inference_bodies_are_declared(document: dict[str, Any]) -> None:
    for path in ("/v2/models/{model_name}/infer",
                 "/v2/models/{model_name}/versions/{version}/infer"):  # fmt: skip
        operation = document["paths"][path]["post"]
        assert set(operation["requestBody"]["content"]) == {
            "application/json", "application/octet-stream",
        }  # fmt: skip
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json", "application/octet-stream",
        }  # fmt: skip
        header = [p for p in operation["parameters"] if p["in"] == "header"]
        assert [p["name"] for p in header] == ["Inference-Header-Content-Length"]
        assert {p["name"] for p in operation["parameters"] if p["in"] == "path"} <= {
            "model_name", "version",
        }  # fmt: skip
        assert {int(s) for s in operation["responses"] if s != "200"} == set(HTTP_STATUS.values())
    predict = document["paths"]["/v1/models/{model_name}:predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json"}
    assert [p["name"] for p in predict["parameters"]] == ["model_name"]


async def test_metrics_are_text(document: dict[str, Any], client: httpx.AsyncClient) -> None:
    content = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/plain"}
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")


async def test_examples_are_answered(client: httpx.AsyncClient, document: dict[str, Any]) -> None:
    """The bodies the document shows as examples work against the example model."""
    for path, url in [
        ("/v2/models/{model_name}/infer", "/v2/models/identity/infer"),
        ("/v1/models/{model_name}:predict", "/v1/models/identity:predict"),
    ]:
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        response = await client.post(url, json=body["example"])
        assert response.status_code == 200, (url, response.text)
