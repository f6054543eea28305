"""TopK: logits -> the k most probable labels and their softmax probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ember.transformers.classify import TopK
from ember.transformers.step import BadInput, Spec


def _labels(folder: Path, names: list[str], *, name: str = "labels.txt", end: str = "\n") -> Path:
    path = folder / name
    path.write_bytes("".join(f"{n}{end}" for n in names).encode("utf-8"))
    return folder


def _names(count: int) -> list[str]:
    return [f"class_{i}" for i in range(count)]


def _softmax64(logits: np.ndarray) -> np.ndarray:
    wide = logits.astype(np.float64)
    exp = np.exp(wide - wide.max(axis=1, keepdims=True))
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def test_declares_its_tensors(tmp_path: Path) -> None:
    step = TopK(
        model_dir=_labels(tmp_path, _names(10)),
        input="out",
        k=3,
        label_output="names",
        score_output="probs",
    )
    assert step.classes == 10
    assert list(step.consumes) == [Spec("out", "FP32", (-1, 10))]
    assert list(step.produces) == [Spec("names", "BYTES", (-1, 3)), Spec("probs", "FP32", (-1, 3))]


def test_scores_are_the_top_softmax_probabilities(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Some rows far from zero: a softmax without the max shift would overflow on them.
    logits = (rng.standard_normal((6, 50)) * np.array([[1], [5], [30], [1000], [1], [80]])).astype(
        np.float32
    )
    step = TopK(model_dir=_labels(tmp_path, _names(50)), k=5)
    out = step({"logits": logits})
    labels, scores = out["label"], out["score"]
    assert labels.shape == (6, 5) and labels.dtype == object
    assert scores.shape == (6, 5) and scores.dtype == np.float32
    reference = _softmax64(logits)
    expected_order = np.argsort(-reference, axis=1, kind="stable")[:, :5]
    for row in range(6):
        assert [label.decode() for label in labels[row]] == [
            f"class_{i}" for i in expected_order[row]
        ]
        # Against the reference rounded to float32, where the 1000x row's runners-up are 0.
        want = reference[row, expected_order[row]].astype(np.float32)
        assert np.allclose(scores[row], want, rtol=1e-6, atol=0)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.all(scores.sum(axis=1) <= 1 + 1e-6)
    assert np.isfinite(scores).all()


def test_k_equal_to_classes_gives_a_full_distribution(tmp_path: Path) -> None:
    step = TopK(model_dir=_labels(tmp_path, ["cat", "dog", "fish"]), k=3)
    out = step({"logits": np.array([[0.0, 2.0, 1.0]], dtype=np.float32)})
    assert out["label"].tolist() == [[b"dog", b"fish", b"cat"]]
    assert np.isclose(out["score"].sum(), 1.0, atol=1e-6)
    assert np.allclose(out["score"][0], _softmax64(np.array([[2.0, 1.0, 0.0]]))[0], rtol=1e-6)


def test_ties_keep_the_class_order(tmp_path: Path) -> None:
    step = TopK(model_dir=_labels(tmp_path, list("abcdef")), k=4)
    out = step({"logits": np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0]], dtype=np.float32)})
    assert out["label"].tolist() == [[b"b", b"c", b"e", b"f"]]
    assert np.all(out["score"] == out["score"][0, 0])


def test_order_follows_the_logits_where_probabilities_underflow(tmp_path: Path) -> None:
    step = TopK(model_dir=_labels(tmp_path, list("abcd")), k=4)
    # Every class but the first has probability 0.0 in float64; the logits still rank them.
    out = step({"logits": np.array([[-3000.0, -1000.0, 0.0, -2000.0]], dtype=np.float32)})
    assert out["label"].tolist() == [[b"c", b"b", b"d", b"a"]]
    assert out["score"].tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_labels_are_utf8_bytes_and_files_may_use_crlf(tmp_path: Path) -> None:
    names = ["chat noir", "Große Katze", "猫"]
    step = TopK(model_dir=_labels(tmp_path, names, end="\r\n"), k=3)
    out = step({"logits": np.array([[0.0, 1.0, 2.0]], dtype=np.float32)})
    assert out["label"].tolist() == [[n.encode("utf-8") for n in reversed(names)]]


def test_a_request_of_no_rows_gives_empty_outputs(tmp_path: Path) -> None:
    step = TopK(model_dir=_labels(tmp_path, _names(10)), k=2)
    out = step({"logits": np.zeros((0, 10), dtype=np.float32)})
    assert out["label"].shape == (0, 2) and out["score"].shape == (0, 2)


def test_labels_path_is_relative_to_the_model_folder(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    _labels(tmp_path / "meta", _names(4), name="classes.txt")
    step = TopK(model_dir=tmp_path, labels="meta/classes.txt", k=2)
    assert step.classes == 4


@pytest.mark.parametrize("k", [0, -1, 11, True, 2.5, "3", None])
def test_k_must_be_from_1_to_the_number_of_classes(tmp_path: Path, k: Any) -> None:
    with pytest.raises(ValueError, match="k must be an integer from 1 to 10"):
        TopK(model_dir=_labels(tmp_path, _names(10)), k=k)


def test_classes_must_match_the_labels_file(tmp_path: Path) -> None:
    folder = _labels(tmp_path, _names(999))
    with pytest.raises(ValueError, match="has 999 labels, but classes is 1000"):
        TopK(model_dir=folder, classes=1000)
    assert TopK(model_dir=folder, classes=999).classes == 999


@pytest.mark.parametrize(
    ("content", "error", "fragment"),
    [
        (b"a\n\nb\n", ValueError, "line 2 is blank"),
        (b"a\nb\n\n", ValueError, "line 3 is blank"),
        (b"", ValueError, "holds no labels"),
        (b"\xff\xfe\x00", ValueError, "is not UTF-8"),
    ],
)
def test_bad_labels_files(
    tmp_path: Path, content: bytes, error: type[Exception], fragment: str
) -> None:
    (tmp_path / "labels.txt").write_bytes(content)
    with pytest.raises(error, match=fragment):
        TopK(model_dir=tmp_path, k=1)


def test_a_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"labels file .*nope\.txt does not exist"):
        TopK(model_dir=tmp_path, labels="nope.txt")


def test_outputs_must_have_two_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both 'x'"):
        TopK(model_dir=_labels(tmp_path, _names(5)), label_output="x", score_output="x")


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({}, "input 'logits' is missing"),
        ({"logits": np.zeros((2, 9), dtype=np.float32)}, r"must be \[rows, 10\], got \(2, 9\)"),
        ({"logits": np.zeros(10, dtype=np.float32)}, r"must be \[rows, 10\]"),
        (
            {"logits": np.array([[0.0] * 10, [0.0] * 9 + [np.nan]], dtype=np.float32)},
            "row 1 holds NaN or infinite logits",
        ),
        (
            {"logits": np.array([[np.inf] + [0.0] * 9], dtype=np.float32)},
            "row 0 holds NaN or infinite logits",
        ),
    ],
)
def test_bad_logits(tmp_path: Path, tensors: dict[str, np.ndarray], fragment: str) -> None:
    step = TopK(model_dir=_labels(tmp_path, _names(10)))
    with pytest.raises(BadInput, match=fragment):
        step(tensors)
