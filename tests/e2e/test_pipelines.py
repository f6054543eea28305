"""Text and images through real processes: `minilm` and `resnet` with their [pipeline] in the
predictor, and the same chain in a separate `ember transformer` calling a `--no-pipeline`
predictor over V2 REST and V2 gRPC, with tritonclient and plain HTTP as clients."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

EmberProcess = Any
ErrorCheck = Any

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests/unit/fixtures_minilm/reference.json").read_text())
SENTENCES: list[str] = REFERENCE["sentences"]
EXPECTED = np.array(REFERENCE["embeddings"], dtype=np.float32)


def _grpc_port(server: EmberProcess) -> int:
    return int(server.args[server.args.index("--grpc_port") + 1])


def _http(server: EmberProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)


def _grpc(server: EmberProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{_grpc_port(server)}")


def _embed_v1(server: EmberProcess, texts: list[str]) -> np.ndarray:
    response = server.post("/v1/models/minilm:predict", json={"instances": texts})
    assert response.status_code == 200, response.text
    return np.array(response.json()["predictions"], dtype=np.float32)


def _embed_http(server: EmberProcess, texts: list[str]) -> np.ndarray:
    tensor = httpclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = _http(server).infer("minilm", [tensor])
    return np.asarray(result.as_numpy("embedding"))


def _embed_grpc(server: EmberProcess, texts: list[str]) -> np.ndarray:
    tensor = grpcclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = _grpc(server).infer("minilm", [tensor])
    return np.asarray(result.as_numpy("embedding"))


def _jpeg(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _png(width: int = 200, height: int = 300) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 30, 255)).save(out, format="PNG")
    return out.getvalue()


def _huge_png_header(side: int = 20000) -> bytes:
    """A PNG that claims side x side pixels: its header is valid, its pixel data is not (a
    server must refuse it from the header, before it decodes anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _classify_http(server: EmberProcess, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    result = _http(server).infer("resnet", [tensor])
    return np.asarray(result.as_numpy("label")), np.asarray(result.as_numpy("score"))


# --- in the predictor ------------------------------------------------------------------------
def test_metadata_shows_text_in_and_embeddings_out(main_server: EmberProcess) -> None:
    meta = main_server.get("/v2/models/minilm").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    meta = main_server.get("/v2/models/resnet").json()
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("label", "BYTES", [-1, 5]),
        ("score", "FP32", [-1, 5]),
    ]


def test_v1_sentences_match_the_reference_embeddings(main_server: EmberProcess) -> None:
    got = _embed_v1(main_server, SENTENCES)
    assert got.shape == EXPECTED.shape
    assert np.abs(got - EXPECTED).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_v2_bytes_over_http_and_grpc_match_the_reference(main_server: EmberProcess) -> None:
    for embed in (_embed_http, _embed_grpc):
        got = embed(main_server, SENTENCES)
        assert np.abs(got - EXPECTED).max() < 1e-4, embed.__name__


def test_a_sentence_alone_equals_it_in_a_padded_batch(main_server: EmberProcess) -> None:
    short = min(SENTENCES, key=len) or "short"
    alone = _embed_http(main_server, [short])[0]
    longest = max(SENTENCES, key=len)
    # In one request with longer sentences, and in concurrent requests the batcher merges.
    together = _embed_http(main_server, [longest, short, longest])[1]
    with ThreadPoolExecutor(8) as pool:
        texts = [[longest]] * 7 + [[short]]
        merged = list(pool.map(lambda t: _embed_http(main_server, t), texts))[-1][0]
    assert np.abs(alone - together).max() < 1e-5
    assert np.abs(alone - merged).max() < 1e-5


def test_a_text_longer_than_the_limit_is_truncated(main_server: EmberProcess) -> None:
    long_text = " ".join(["serving"] * 2000)
    got = _embed_v1(main_server, [long_text, long_text + " and more words at the end"])
    assert got.shape == (2, 384)
    # Only the first 256 tokens count: words past them change nothing.
    assert np.abs(got[0] - got[1]).max() < 1e-5


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"instances": []}, "non-empty"),
        ({"instances": [1]}, "expected a string"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}, "text"),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
         "datatype"),
    ],
)  # fmt: skip
def test_bad_text_requests_get_a_clear_400(
    main_server: EmberProcess, expect_error: ErrorCheck, body: dict[str, Any], fragment: str
) -> None:
    path = "/v1/models/minilm:predict" if "instances" in body else "/v2/models/minilm/infer"
    expect_error(main_server.post(path, json=body), 400, fragment)
    assert _embed_v1(main_server, ["still serving"]).shape == (1, 384)


def test_non_utf8_text_gets_a_400_naming_the_element(main_server: EmberProcess) -> None:
    tensor = httpclient.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"fine", b"\xff\xfe broken"], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        _http(main_server).infer("minilm", [tensor])
    assert caught.value.status() == "400"
    assert "utf-8" in str(caught.value.message()).lower() and "1" in str(caught.value.message())
    assert _embed_http(main_server, ["still serving"]).shape == (1, 384)


def test_images_as_bytes_and_as_base64(main_server: EmberProcess) -> None:
    labels, scores = _classify_http(main_server, [_jpeg(), _png()])
    assert labels.shape == (2, 5) and scores.shape == (2, 5)
    assert all(isinstance(x, bytes) and x for x in labels.reshape(-1))
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores.sum(axis=1) <= 1 + 1e-5)
    v1 = main_server.post(
        "/v1/models/resnet:predict",
        json={"instances": [{"b64": base64.b64encode(_jpeg()).decode()}]},
    )
    assert v1.status_code == 200, v1.text
    (prediction,) = v1.json()["predictions"]
    assert prediction["label"] == [x.decode() for x in labels[0]]
    assert np.allclose(prediction["score"], scores[0], atol=1e-6)


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (b"not an image at all", "element 0"),
        (_jpeg()[:200], "element 0"),
        (_huge_png_header(), "20000x20000"),
    ],
    ids=["corrupt", "truncated", "20000x20000"],
)
def test_bad_images_get_a_clear_400(
    main_server: EmberProcess, expect_error: ErrorCheck, image: bytes, fragment: str
) -> None:
    body = {"instances": [{"b64": base64.b64encode(image).decode()}]}
    started = time.monotonic()
    expect_error(main_server.post("/v1/models/resnet:predict", json=body), 400, fragment)
    assert time.monotonic() - started < 5.0
    labels, _ = _classify_http(main_server, [_jpeg(seed=3)])
    assert labels.shape == (1, 5)


# --- the same chain in `ember transformer` -----------------------------------------------------
@pytest.fixture(scope="module")
def bare_predictor(ember_session: Any) -> EmberProcess:
    """`ember serve --no-pipeline`: the models' own tensors, as a transformer sends them."""
    return ember_session(
        "--model-repository", ROOT / "models", "--model", "minilm", "--model", "resnet",
        "--no-pipeline",
    )  # fmt: skip


@pytest.fixture(scope="module", params=["v2", "grpc-v2"])
def transformer(request: pytest.FixtureRequest, ember_session: Any, bare_predictor: EmberProcess)\
        -> Iterator[EmberProcess]:  # fmt: skip
    protocol = request.param
    port = bare_predictor.port if protocol == "v2" else _grpc_port(bare_predictor)
    yield ember_session(
        "--model-repository", ROOT / "models", "--model", "minilm", "--model", "resnet",
        "--predictor_host", f"127.0.0.1:{port}", "--predictor_protocol", protocol,
        command="transformer",
    )  # fmt: skip


def test_the_bare_predictor_shows_the_models_own_tensors(bare_predictor: EmberProcess) -> None:
    meta = bare_predictor.get("/v2/models/minilm").json()
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]


def test_a_transformer_gives_the_same_answers(
    transformer: EmberProcess, main_server: EmberProcess
) -> None:
    assert transformer.get("/v2/models/minilm").json()["inputs"][0]["name"] == "text"
    for embed in (_embed_v1, _embed_http, _embed_grpc):
        got = embed(transformer, SENTENCES)
        assert np.abs(got - EXPECTED).max() < 1e-4, embed.__name__
    images = [_jpeg(seed=5), _png()]
    assert np.array_equal(
        _classify_http(transformer, images)[0], _classify_http(main_server, images)[0]
    )


def test_a_transformer_answers_bad_input_itself(
    transformer: EmberProcess, expect_error: ErrorCheck
) -> None:
    body = {"instances": [{"b64": base64.b64encode(_huge_png_header()).decode()}]}
    expect_error(transformer.post("/v1/models/resnet:predict", json=body), 400, "20000x20000")
    assert _embed_v1(transformer, ["still serving"]).shape == (1, 384)


@pytest.mark.parametrize("protocol", ["v1", "v2", "grpc-v2"])
def test_a_transformer_whose_predictor_is_down_answers_503(
    ember: Any, expect_error: ErrorCheck, protocol: str
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = sock.getsockname()[1]  # closed again before the transformer calls it
    server = ember(
        "--model-repository", ROOT / "models", "--model_name", "minilm",
        "--predictor_host", f"127.0.0.1:{nobody}", "--predictor_protocol", protocol,
        command="transformer",
    )  # fmt: skip
    response = server.post("/v1/models/minilm:predict", json={"instances": ["hello"]})
    expect_error(response, 503, f"predictor 127.0.0.1:{nobody} ({protocol})")
    # The transformer's own checks still answer: bad input is refused before any call.
    expect_error(server.post("/v1/models/minilm:predict", json={"instances": []}), 400)
