"""The [pipeline] chain: loading and checking steps, where they run, and what their errors
become; then through the whole predictor in process (ASGI app)."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ember.server.config import load_model_config
from ember.server.dataplane import DataPlane
from ember.server.errors import InvalidInput, ModelFailed
from ember.server.imports import LoadError
from ember.server.metrics import PredictorMetrics
from ember.server.repository import ModelRepository
from ember.server.rest.app import build_app
from ember.transformers.chain import Chain, ChainError

STEPS = '''
import asyncio
import threading

import numpy as np

from ember.transformers.step import BadInput, Spec

SEEN = []


class Words:
    """text BYTES [-1] -> counts INT64 [-1, 1]"""

    consumes = (Spec("text", "BYTES", (-1,)),)

    def __init__(self, model_dir, output="counts", dtype="int64"):
        self.produces = (Spec(output, "INT64", (-1, 1)),)
        self._output = output
        self._dtype = dtype

    def __call__(self, tensors):
        SEEN.append(("Words", threading.current_thread().name))
        words = []
        for i, item in enumerate(tensors["text"]):
            if item == b"bad":
                raise BadInput(f"input 'text' element {i} is bad")
            words.append(len(item.split()))
        return {self._output: np.array(words, dtype=self._dtype).reshape(-1, 1)}


class Double:
    consumes = (Spec("counts", "INT64", (-1, 1)),)
    produces = (Spec("counts", "INT64", (-1, 1)),)

    def __init__(self, model_dir):
        pass

    def __call__(self, tensors):
        SEEN.append(("Double", threading.current_thread().name))
        return {"counts": tensors["counts"] * 2}


class Label:
    """Async: reads the model's output and the request's own text."""

    consumes = (Spec("total", "INT64", (-1, 1)), Spec("text", "BYTES", (-1,)))
    produces = (Spec("label", "BYTES", (-1,)),)

    def __init__(self, model_dir, rows_off=0):
        self._rows_off = rows_off

    async def __call__(self, tensors):
        SEEN.append(("Label", threading.current_thread().name))
        await asyncio.sleep(0)
        total = tensors["total"].reshape(-1)
        texts = tensors["text"]
        labels = [t + b"=" + str(int(n)).encode() for t, n in zip(texts, total)]
        labels = labels[: len(labels) - self._rows_off] if self._rows_off else labels
        return {"label": np.array(labels, dtype=object)}


class Broken:
    consumes = (Spec("text", "BYTES", (-1,)),)
    produces = (Spec("counts", "INT64", (-1, 1)),)

    def __init__(self, model_dir, mode="float"):
        self._mode = mode

    def __call__(self, tensors):
        if self._mode == "float":
            return {"counts": np.zeros((len(tensors["text"]), 1), dtype=np.float32)}
        if self._mode == "list":
            return [1, 2]
        raise RuntimeError("step bug")


class NoSpecs:
    def __init__(self, model_dir):
        pass

    def __call__(self, tensors):
        return {}


class Adder:
    """The model: a python-format class."""

    def __init__(self, model_dir, device):
        pass

    def predict(self, inputs):
        return {"total": inputs["counts"] + 1}
'''


def _model(tmp_path: Path, pre: str, post: str, extra: str = "") -> Path:
    folder = tmp_path / "words"
    folder.mkdir(exist_ok=True)
    (folder / "steps.py").write_text(STEPS)
    (folder / "model.toml").write_text(
        textwrap.dedent(
            """
            name = "words"
            format = "python"
            class = "steps:Adder"
            max_batch_size = 8
            {extra}
            [[inputs]]
            name = "counts"
            datatype = "INT64"
            shape = [-1, 1]
            [[outputs]]
            name = "total"
            datatype = "INT64"
            shape = [-1, 1]
            [pipeline]
            [[pipeline.inputs]]
            name = "text"
            datatype = "BYTES"
            shape = [-1]
            [[pipeline.outputs]]
            name = "label"
            datatype = "BYTES"
            shape = [-1]
            {pre}
            {post}
            """
        ).format(pre=pre, post=post, extra=extra)
    )
    return folder


PRE = """
[[pipeline.preprocess]]
class = "steps:Words"
[[pipeline.preprocess]]
class = "steps:Double"
"""
POST = """
[[pipeline.postprocess]]
class = "steps:Label"
"""


def _load(folder: Path) -> Chain:
    return Chain.load(load_model_config(folder), folder)


def test_a_connected_chain_loads(tmp_path: Path) -> None:
    chain = _load(_model(tmp_path, PRE, POST))
    chain.close()


@pytest.mark.parametrize(
    ("pre", "post", "message"),
    [
        # The model's input is never produced.
        ('[[pipeline.preprocess]]\nclass = "steps:Double"', POST,
         r"preprocess\[0\] steps:Double needs 'counts' \(INT64 \[-1, 1\]\), which nothing"),
        # Produced under another name.
        ('[[pipeline.preprocess]]\nclass = "steps:Words"\nkwargs = { output = "n" }', POST,
         r"the model's input needs 'counts'"),
        # The pipeline's output is never produced.
        (PRE, "", r"the pipeline's output needs 'label'"),
        # Wrong keyword argument.
        ('[[pipeline.preprocess]]\nclass = "steps:Words"\nkwargs = { colour = 1 }', POST,
         r"preprocess\[0\] steps:Words: TypeError: .*colour"),
        # A step without declarations.
        ('[[pipeline.preprocess]]\nclass = "steps:NoSpecs"', POST, r"'consumes' must be"),
    ],
)  # fmt: skip
def test_a_chain_that_does_not_connect_is_a_startup_error(
    tmp_path: Path, pre: str, post: str, message: str
) -> None:
    with pytest.raises(ChainError, match=message):
        _load(_model(tmp_path, pre, post))


def test_a_datatype_mismatch_names_both_sides(tmp_path: Path) -> None:
    folder = _model(tmp_path, PRE, POST)
    toml = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(
        toml.replace(
            'datatype = "INT64"\nshape = [-1, 1]\n[[out',
            'datatype = "INT32"\nshape = [-1, 1]\n[[out',
        )
    )
    with pytest.raises(ChainError, match=r"needs 'counts' as INT32 \[-1, 1\], but it is INT64"):
        _load(folder)


def test_a_step_that_cannot_be_imported_is_a_load_error(tmp_path: Path) -> None:
    pre = '[[pipeline.preprocess]]\nclass = "no_such_module_here:Step"'
    with pytest.raises(LoadError, match="no_such_module_here"):
        _load(_model(tmp_path, pre, POST))


async def test_sync_steps_share_one_pool_trip_and_async_ones_run_on_the_loop(
    tmp_path: Path,
) -> None:
    chain = _load(_model(tmp_path, PRE, POST))
    text = np.array([b"a b c", b"d"], dtype=object)
    try:
        module = sys.modules[type(chain._pre[0].steps[0].step).__module__]
        module.SEEN.clear()
        tensors = await chain.preprocess({"text": text})
        assert tensors["counts"].tolist() == [[6], [2]]
        assert tensors["text"] is text  # earlier tensors stay visible to later steps
        out = await chain.postprocess({**tensors, "total": tensors["counts"] + 1})
        assert out["label"].tolist() == [b"a b c=7", b"d=3"]
    finally:
        chain.close()
    threads = dict(module.SEEN)
    assert threads["Words"] == threads["Double"]
    assert threads["Words"].startswith("pipeline-words")
    assert threads["Label"] == threading.current_thread().name


async def test_bad_input_from_a_step_is_the_clients_error(tmp_path: Path) -> None:
    chain = _load(_model(tmp_path, PRE, POST))
    try:
        with pytest.raises(InvalidInput, match="element 1 is bad"):
            await chain.preprocess({"text": np.array([b"ok", b"bad"], dtype=object)})
    finally:
        chain.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ('{ mode = "float" }', r"produced 'counts' as float32 \[2, 1\], declared INT64"),
        ('{ mode = "list" }', "returned list, expected a dict"),
    ],
)
async def test_a_step_that_breaks_its_declaration_is_a_model_failure(
    tmp_path: Path, kwargs: str, message: str
) -> None:
    pre = f'[[pipeline.preprocess]]\nclass = "steps:Broken"\nkwargs = {kwargs}'
    chain = _load(_model(tmp_path, pre, POST))
    try:
        with pytest.raises(ModelFailed, match=message):
            await chain.preprocess({"text": np.array([b"a", b"b"], dtype=object)})
    finally:
        chain.close()


async def test_a_step_that_drops_rows_is_a_model_failure(tmp_path: Path) -> None:
    post = '[[pipeline.postprocess]]\nclass = "steps:Label"\nkwargs = { rows_off = 1 }'
    chain = _load(_model(tmp_path, PRE, post))
    try:
        tensors = {"text": np.array([b"a", b"b"], dtype=object)}
        tensors["total"] = np.array([[1], [2]])
        with pytest.raises(ModelFailed, match="produced 1 rows of 'label' for a request of 2"):
            await chain.postprocess(tensors)
    finally:
        chain.close()


# --- through the predictor, in process ------------------------------------------------------


@pytest.fixture
async def words(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    folder = _model(tmp_path, PRE, POST, extra="[batching]\nmax_queue_delay_us = 1000")
    metrics = PredictorMetrics()
    repository = ModelRepository([(load_model_config(folder), folder)], metrics)
    await repository.load("words")
    app = build_app(DataPlane(repository, metrics), max_body_bytes=1 << 20)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
        yield client
    await repository.close()


async def test_metadata_shows_the_pipelines_tensors(words: httpx.AsyncClient) -> None:
    meta = (await words.get("/v2/models/words")).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]}]
    config = (await words.get("/v2/models/words/config")).json()
    assert [i["name"] for i in config["input"]] == ["text"]


async def test_v2_and_v1_requests_run_the_chain(words: httpx.AsyncClient) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a b", "c"]}]}
    answer = (await words.post("/v2/models/words/infer", json=body)).json()
    assert answer["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["a b=5", "c=3"]}
    ]
    v1 = (await words.post("/v1/models/words:predict", json={"instances": ["x y z"]})).json()
    assert v1 == {"predictions": ["x y z=7"]}
    b64 = {"instances": [{"b64": "eCB5"}]}  # "x y"
    assert (await words.post("/v1/models/words:predict", json=b64)).json() == {
        "predictions": ["x y=5"]
    }


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/words/infer",
         {"inputs": [{"name": "counts", "datatype": "INT64", "shape": [1, 1], "data": [1]}]},
         400, "unknown input 'counts'"),
        ("/v2/models/words/infer",
         {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["bad"]}]},
         400, "element 0 is bad"),
        ("/v1/models/words:predict", {"instances": [{"b64": "%%%"}]}, 400, "not valid base64"),
        ("/v1/models/words:predict", {"instances": [7]}, 400, "expected a string"),
        ("/v1/models/words:predict", {"instances": []}, 400, "non-empty list"),
    ],
)  # fmt: skip
async def test_bad_requests_get_a_400_and_the_model_keeps_serving(
    words: httpx.AsyncClient, path: str, body: dict[str, object], status: int, message: str
) -> None:
    response = await words.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    ok = await words.post("/v1/models/words:predict", json={"instances": ["a"]})
    assert ok.json() == {"predictions": ["a=3"]}
