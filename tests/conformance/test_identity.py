"""Every datatype through `identity`: binary and JSON over HTTP, raw contents over gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import ml_dtypes
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

if TYPE_CHECKING:
    from conftest import Api, Server

pytestmark = pytest.mark.e2e

INTEGERS = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
DATATYPES = ["BOOL", *INTEGERS, "FP16", "BF16", "FP32", "FP64", "BYTES"]
MIB = 1024 * 1024


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    """A [rows, 3] array of `datatype` with its awkward values (extremes, empty, non-UTF-8)."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]] * rows)[:rows]
    if datatype == "BYTES":
        items = [
            b"ascii",
            b"",
            "caf\u00e9 \u2603".encode(),
            b"\xff\xfe\x00\x80",
            b"\x00",
            b"x" * 300,
        ]
        return np.array((items * rows)[: rows * 3], dtype=np.object_).reshape(rows, 3)
    if datatype in INTEGERS:
        dtype = np.dtype(datatype.lower())
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
        return np.array((values * rows)[: rows * 3], dtype=dtype).reshape(rows, 3)
    dtype = {"FP16": np.float16, "BF16": ml_dtypes.bfloat16, "FP32": np.float32,
             "FP64": np.float64}[datatype]  # fmt: skip
    values = [-1.5, 0.0, 3.25, 65504.0 if datatype == "FP16" else 1e30, -0.0, 0.1]
    return np.array((values * rows)[: rows * 3], dtype=dtype).reshape(rows, 3)


def utf8_sample(rows: int = 2) -> np.ndarray:
    """BYTES that JSON can carry."""
    items = [b"ascii", b"", "caf\u00e9 \u2603".encode(), b"z" * 40]
    return np.array((items * rows)[: rows * 3], dtype=np.object_).reshape(rows, 3)


def assert_same(got: np.ndarray | None, want: np.ndarray) -> None:
    assert got is not None
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype == np.object_:
        # JSON BYTES outputs come back as str, binary ones as bytes.
        as_bytes = [x.encode() if isinstance(x, str) else x for x in got.reshape(-1)]
        assert as_bytes == list(want.reshape(-1))
        return
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_binary(api: Api, datatype: str) -> None:
    array = sample(datatype)
    result = api.infer("identity", {f"INPUT_{datatype}": array}, [f"OUTPUT_{datatype}"])
    assert_same(result.as_numpy(f"OUTPUT_{datatype}"), array)
    [output] = api.response(result)["outputs"]
    assert output["name"] == f"OUTPUT_{datatype}"
    assert output["datatype"] == datatype
    assert [int(d) for d in output["shape"]] == [2, 3]


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d not in ("FP16", "BF16")])
@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(False, False), (False, True), (True, False)]
)
def test_every_datatype_json_http(
    http_api: Api, datatype: str, binary_in: bool, binary_out: bool
) -> None:  # fmt: skip
    array = utf8_sample() if datatype == "BYTES" else sample(datatype)
    result = http_api.infer(
        "identity", {f"INPUT_{datatype}": array}, [f"OUTPUT_{datatype}"],
        binary=binary_in, binary_out=binary_out,
    )  # fmt: skip
    assert_same(result.as_numpy(f"OUTPUT_{datatype}"), array)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_as_json_output(http_api: Api, datatype: str) -> None:
    """FP16/BF16 may go out as JSON numbers (the values are exact in any wider float)."""
    array = sample(datatype)
    result = http_api.infer(
        "identity", {f"INPUT_{datatype}": array}, [f"OUTPUT_{datatype}"], binary_out=False
    )
    assert_same(result.as_numpy(f"OUTPUT_{datatype}"), array)


def test_fp16_json_input_is_rejected(http_api: Api) -> None:
    with http_api.raises(400, "INVALID_ARGUMENT", "INPUT_FP16", "binary"):
        http_api.infer("identity", {"INPUT_FP16": sample("FP16")}, binary=False)


def test_bf16_json_input_is_rejected(http_api: Api, server: Server) -> None:
    """tritonclient refuses to send BF16 as JSON itself; a hand-written request gets a 400."""
    with pytest.raises(InferenceServerException, match="binary"):
        http_api.inputs({"INPUT_BF16": sample("BF16")}, binary=False)
    body = {"inputs": [{"name": "INPUT_BF16", "datatype": "BF16", "shape": [1, 2],
                        "data": [1.0, 2.0]}]}  # fmt: skip
    response = httpx.post(f"{server.http_url}/v2/models/identity/infer", json=body)
    assert response.status_code == 400
    assert "binary" in response.json()["error"]


def test_bf16_must_be_ml_dtypes(api: Api) -> None:
    """tritonclient maps BF16 to ml_dtypes.bfloat16; float32 data is refused client-side."""
    item = api.module.InferInput("INPUT_BF16", [1, 2], "BF16")
    with pytest.raises(InferenceServerException, match="ml_dtypes"):
        item.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))


def test_non_finite_floats_binary(api: Api) -> None:
    arrays = {
        f"INPUT_{d}": np.array([[np.nan, np.inf, -np.inf]], dtype=t)
        for d, t in (("FP16", np.float16), ("BF16", ml_dtypes.bfloat16), ("FP32", np.float32),
                     ("FP64", np.float64))
    }  # fmt: skip
    result = api.infer("identity", arrays)
    for name, array in arrays.items():
        got = result.as_numpy(name.replace("INPUT_", "OUTPUT_"))
        assert got is not None
        assert got.dtype == array.dtype
        assert got.tobytes() == array.tobytes()  # bit for bit: NaN != NaN


def test_all_inputs_at_once(api: Api) -> None:
    arrays = {f"INPUT_{d}": sample(d, rows=d_index % 3 + 1) for d_index, d in enumerate(DATATYPES)}
    result = api.infer("identity", arrays)
    for name, array in arrays.items():
        assert_same(result.as_numpy(name.replace("INPUT_", "OUTPUT_")), array)


def test_outputs_default_to_those_produced(api: Api) -> None:
    arrays = {"INPUT_INT8": sample("INT8"), "INPUT_BYTES": sample("BYTES")}
    result = api.infer("identity", arrays)
    names = {o["name"] for o in api.response(result)["outputs"]}
    assert names == {"OUTPUT_INT8", "OUTPUT_BYTES"}


def test_requested_subset_of_outputs(api: Api) -> None:
    arrays = {f"INPUT_{d}": sample(d) for d in ("INT32", "FP64", "BYTES", "BOOL")}
    result = api.infer("identity", arrays, ["OUTPUT_FP64", "OUTPUT_BOOL"])
    assert_same(result.as_numpy("OUTPUT_FP64"), arrays["INPUT_FP64"])
    assert_same(result.as_numpy("OUTPUT_BOOL"), arrays["INPUT_BOOL"])
    assert result.as_numpy("OUTPUT_INT32") is None
    assert result.as_numpy("OUTPUT_BYTES") is None


def test_mixed_binary_and_json_outputs(http_api: Api) -> None:
    arrays = {"INPUT_INT16": sample("INT16"), "INPUT_FP32": sample("FP32")}
    outputs = [http_api.module.InferRequestedOutput("OUTPUT_INT16", binary_data=True),
               http_api.module.InferRequestedOutput("OUTPUT_FP32", binary_data=False)]  # fmt: skip
    result = http_api.client.infer(
        "identity", http_api.inputs(arrays, binary=False), outputs=outputs
    )
    response = result.get_response()
    by_name = {o["name"]: o for o in response["outputs"]}
    assert "binary_data_size" in by_name["OUTPUT_INT16"]["parameters"]
    assert "data" in by_name["OUTPUT_FP32"]
    assert_same(result.as_numpy("OUTPUT_INT16"), arrays["INPUT_INT16"])
    assert_same(result.as_numpy("OUTPUT_FP32"), arrays["INPUT_FP32"])


def test_request_id_is_echoed(api: Api) -> None:
    result = api.infer("identity", {"INPUT_INT32": sample("INT32")}, request_id="req-42")
    response = api.response(result)
    assert response["id"] == "req-42"
    assert response["model_name"] == "identity"


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL", "BF16"])
def test_empty_tensors(api: Api, shape: tuple[int, int], datatype: str) -> None:
    dtype = sample(datatype).dtype
    array = np.empty(shape, dtype=dtype)
    result = api.infer("identity", {f"INPUT_{datatype}": array})
    got = result.as_numpy(f"OUTPUT_{datatype}")
    assert got is not None
    assert got.shape == shape


def test_empty_tensor_json(http_api: Api) -> None:
    array = np.empty((0, 4), dtype=np.int64)
    result = http_api.infer("identity", {"INPUT_INT64": array}, ["OUTPUT_INT64"], False, False)
    assert_same(result.as_numpy("OUTPUT_INT64"), array)


def test_bytes_edge_cases(api: Api) -> None:
    items = [b"", b"\xff", b"\x00\x00", b"\xc3\x28", b"", "\U0001f600".encode(), b"a" * 70000, b""]
    array = np.array(items, dtype=np.object_).reshape(2, 4)
    result = api.infer("identity", {"INPUT_BYTES": array})
    got = result.as_numpy("OUTPUT_BYTES")
    assert got is not None
    assert got.shape == (2, 4)
    assert list(got.reshape(-1)) == items


def test_non_utf8_bytes_as_json_output(http_api: Api) -> None:
    """Bytes JSON cannot carry: a clear 400 telling the client to ask for binary."""
    array = np.array([[b"\xff\xfe"]], dtype=np.object_)
    with http_api.raises(400, "INVALID_ARGUMENT", "UTF-8", "binary"):
        http_api.infer("identity", {"INPUT_BYTES": array}, ["OUTPUT_BYTES"], binary_out=False)


def test_large_tensor_grpc(grpc_api: Api) -> None:
    """A 64 MiB FP32 tensor each way (the server allows 128 MiB messages; tritonclient 2 GiB)."""
    array = np.arange(64 * MIB // 4, dtype=np.float32).reshape(1024, -1)
    assert array.nbytes == 64 * MIB
    got = grpc_api.infer("identity", {"INPUT_FP32": array}).as_numpy("OUTPUT_FP32")
    np.testing.assert_array_equal(got, array)


def test_large_tensor_http(http_api: Api) -> None:
    """60 MiB of binary tensor data: under the 64 MiB body limit with its JSON header."""
    array = np.arange(60 * MIB // 8, dtype=np.float64).reshape(-1, 1024)
    got = http_api.infer("identity", {"INPUT_FP64": array}).as_numpy("OUTPUT_FP64")
    np.testing.assert_array_equal(got, array)


def test_http_body_over_limit(server: Server) -> None:
    body = b"{" + b" " * (64 * MIB) + b"}"
    response = httpx.post(f"{server.http_url}/v2/models/identity/infer", content=body, timeout=30)
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


def test_grpc_message_over_limit(grpc_api: Api) -> None:
    """Past the server's 128 MiB receive limit: RESOURCE_EXHAUSTED naming the sizes."""
    array = np.zeros((1, 132 * MIB // 4), dtype=np.float32)
    with grpc_api.raises(413, "RESOURCE_EXHAUSTED", "larger than max"):
        grpc_api.infer("identity", {"INPUT_FP32": array})
    assert grpc_api.infer("identity", {"INPUT_INT8": sample("INT8")}).as_numpy("OUTPUT_INT8").size


def test_binary_response_framing(server: Server) -> None:
    """Binary outputs: octet-stream and the header length; JSON-only answers: application/json."""
    raw = np.arange(3, dtype="<i4").tobytes()
    header = {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 3],
                          "parameters": {"binary_data_size": len(raw)}}],
              "parameters": {"binary_data_output": True}}  # fmt: skip
    doc = httpx.Request("POST", "http://x", json=header).content
    url = f"{server.http_url}/v2/models/identity/infer"
    headers = {"Inference-Header-Content-Length": str(len(doc))}
    response = httpx.post(url, content=doc + raw, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    assert response.content[length:] == raw
    assert int(response.headers["content-length"]) == len(response.content)

    header["parameters"] = {"binary_data_output": False}
    doc = httpx.Request("POST", "http://x", json=header).content
    headers = {"Inference-Header-Content-Length": str(len(doc))}
    response = httpx.post(url, content=doc + raw, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["outputs"][0]["data"] == [0, 1, 2]


def test_request_parameters_tritonclient_sends(api: Api) -> None:
    """`priority` and `parameters` are accepted (and ignored where they mean nothing here)."""
    result = api.infer(
        "identity", {"INPUT_INT32": sample("INT32")}, priority=1, parameters={"custom": "x"}
    )
    assert_same(result.as_numpy("OUTPUT_INT32"), sample("INT32"))
