"""Built-in classification step: logits -> the k most likely labels and their probabilities,
for a classifier whose labels file names one class per line:

    [[pipeline.postprocess]]
    class = "ember.transformers.classify:TopK"
    kwargs = { labels = "labels.txt", k = 5 }
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ember.transformers.step import BadInput, Spec, Tensors


def _count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"labels file {path} is not UTF-8") from None
    labels = [line.strip() for line in text.splitlines()]
    for number, label in enumerate(labels, start=1):
        if not label:
            # A blank line would shift every later label onto the wrong class.
            raise ValueError(f"labels file {path} line {number} is blank")
    if not labels:
        raise ValueError(f"labels file {path} holds no labels")
    return labels


class TopK:
    """FP32 logits [N, classes] -> `label` BYTES [N, k] (UTF-8) and `score` FP32 [N, k]: the
    k classes of highest probability under a softmax of each row, most likely first.

    `labels` is a file in the model folder with one label per line, line i naming class i.
    `classes`, when given, must equal the number of labels: a check that the file matches the
    model. Classes of equal logit keep their index order. Rows with NaN or infinite logits are
    refused (BadInput): their probabilities are undefined.

    Thread safety: nothing is written after construction.
    """

    def __init__(
        self,
        *,
        model_dir: Path | str,
        input: str = "logits",
        labels: str = "labels.txt",
        k: int = 5,
        classes: int | None = None,
        label_output: str = "label",
        score_output: str = "score",
    ) -> None:
        path = Path(model_dir) / labels
        names = _read_labels(path)
        if classes is not None:
            _count("classes", classes, 1, 2**31 - 1)
            if classes != len(names):
                raise ValueError(
                    f"labels file {path} has {len(names)} labels, but classes is {classes}"
                )
        self.classes = len(names)
        self.k = _count("k", k, 1, self.classes)
        if label_output == score_output:
            raise ValueError(f"label_output and score_output are both '{label_output}'")
        self.input = input
        self.label_output = label_output
        self.score_output = score_output
        self._labels = np.array([name.encode("utf-8") for name in names], dtype=object)
        self.consumes: Sequence[Spec] = (Spec(input, "FP32", (-1, self.classes)),)
        self.produces: Sequence[Spec] = (
            Spec(label_output, "BYTES", (-1, self.k)),
            Spec(score_output, "FP32", (-1, self.k)),
        )

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        logits = tensors.get(self.input)
        if logits is None:
            raise BadInput(f"input '{self.input}' is missing")
        if logits.ndim != 2 or logits.shape[1] != self.classes:
            raise BadInput(
                f"input '{self.input}' must be [rows, {self.classes}], got {logits.shape}"
            )
        # float64: the probabilities of unlikely classes and the sum stay exact to float32.
        wide = logits.astype(np.float64)
        finite = np.isfinite(wide).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise BadInput(f"input '{self.input}' row {row} holds NaN or infinite logits")
        # Order by the logits, not the probabilities: classes far below the maximum all
        # underflow to probability 0 and would tie there.
        order = np.argsort(-wide, axis=1, kind="stable")[:, : self.k]
        shifted = wide - wide.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        top = np.take_along_axis(exp, order, axis=1) / exp.sum(axis=1, keepdims=True)
        return {
            self.label_output: self._labels[order],
            self.score_output: top.astype(np.float32),
        }
