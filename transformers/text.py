"""Built-in text steps: tokenize with a Hugging Face tokenizer.json, mean-pool token vectors,
L2-normalise. Together they compute what sentence-transformers computes for models such as
all-MiniLM-L6-v2, around an encoder that returns the last hidden state:

    [[pipeline.preprocess]]
    class = "ember.transformers.text:Tokenize"
    kwargs = { tokenizer = "tokenizer.json", max_length = 256 }

    [[pipeline.postprocess]]
    class = "ember.transformers.text:MeanPool"

    [[pipeline.postprocess]]
    class = "ember.transformers.text:Normalize"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ember.transformers.step import BadInput, Spec, Tensors

# Tried in this order when tokenizer.json has no padding set up of its own.
_PAD_TOKENS = ("[PAD]", "<pad>")


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _tensor(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    array = tensors.get(name)
    if array is None:
        raise BadInput(f"input '{name}' is missing")
    return array


class Tokenize:
    """BYTES texts [N] -> input_ids, attention_mask, token_type_ids (INT64 [N, L]).

    Each text is cut to `max_length` tokens, [CLS] and [SEP] included (a long text is
    truncated, not refused), and every row is padded to the longest in the request. These
    settings replace any padding or truncation stored in tokenizer.json.

    An empty request (no texts) is refused with BadInput rather than given [0, 0] tensors:
    a forward over zero rows has nothing to compute and not every model takes it.

    Thread safety: the server calls one instance from several threads at once, sharing one
    Rust tokenizer. `encode_batch` only reads it (with the GIL released), so concurrent calls
    are safe; changing padding or truncation writes it, which older tokenizers releases refuse
    while another thread encodes ("RuntimeError: Already borrowed") and 0.23 makes wait, and
    which in either case would change the settings under other requests. So everything is
    configured once here, and `__call__` only encodes.
    """

    def __init__(
        self,
        *,
        model_dir: Path | str,
        tokenizer: str = "tokenizer.json",
        max_length: int = 256,
        input: str = "text",
        pad_token: str | None = None,
    ) -> None:
        self.max_length = _positive("max_length", max_length)
        self.input = input
        path = Path(model_dir) / tokenizer
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for a bad file
            raise ValueError(f"cannot read tokenizer {path}: {exc}") from None
        special = self._tokenizer.num_special_tokens_to_add(is_pair=False)
        if self.max_length < special:
            # tokenizers would not truncate at all then, rather than fail.
            raise ValueError(
                f"max_length {self.max_length} leaves no room for the {special} special tokens"
            )
        pad_id, pad_type_id, pad_token = self._padding(pad_token)
        # Every setting named, so none stored in tokenizer.json (all-MiniLM's pads every text
        # to a fixed 128 and cuts at 128) survives.
        self._tokenizer.enable_truncation(
            max_length=self.max_length, stride=0, strategy="longest_first", direction="right"
        )
        # No `length`: each request is padded to its own longest text.
        self._tokenizer.enable_padding(
            direction="right",
            pad_id=pad_id,
            pad_type_id=pad_type_id,
            pad_token=pad_token,
            pad_to_multiple_of=None,
            length=None,
        )
        self.consumes: Sequence[Spec] = (Spec(input, "BYTES", (-1,)),)
        self.produces: Sequence[Spec] = tuple(
            Spec(name, "INT64", (-1, -1))
            for name in ("input_ids", "attention_mask", "token_type_ids")
        )

    def _padding(self, pad_token: str | None) -> tuple[int, int, str]:
        if pad_token is not None:
            pad_id = self._tokenizer.token_to_id(pad_token)
            if pad_id is None:
                raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary")
            return pad_id, 0, pad_token
        stored: dict[str, Any] | None = self._tokenizer.padding
        if stored is not None:
            return int(stored["pad_id"]), int(stored["pad_type_id"]), str(stored["pad_token"])
        for candidate in _PAD_TOKENS:
            pad_id = self._tokenizer.token_to_id(candidate)
            if pad_id is not None:
                return pad_id, 0, candidate
        raise ValueError(
            f"the tokenizer sets no padding and has none of {list(_PAD_TOKENS)}: "
            "name its padding token with pad_token"
        )

    def _texts(self, array: np.ndarray) -> list[str]:
        if array.ndim != 1:
            raise BadInput(
                f"input '{self.input}' must be one text per row, got shape {list(array.shape)}"
            )
        if array.shape[0] == 0:
            raise BadInput(f"input '{self.input}' holds no texts: send at least one")
        texts: list[str] = []
        for index, element in enumerate(array.tolist()):
            if isinstance(element, bytes):
                try:
                    texts.append(element.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BadInput(
                        f"input '{self.input}' element {index} is not valid UTF-8"
                    ) from None
            elif isinstance(element, str):
                texts.append(element)
            else:
                raise BadInput(
                    f"input '{self.input}' element {index} is {type(element).__name__}, "
                    "expected UTF-8 bytes"
                )
        return texts

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        texts = self._texts(_tensor(tensors, self.input))
        encodings = self._tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }


class MeanPool:
    """Token vectors FP32 [N, L, D] and their attention mask INT64 [N, L] -> FP32 [N, D]: the
    mean of each row's unmasked vectors.

    The vectors usually match the mask in length (the server cuts a batched forward back to
    each request's length). Where they are longer, the extra positions are batch-mates'
    padding and count as masked; a mask longer than the vectors may only add masked positions.
    """

    def __init__(
        self,
        *,
        model_dir: Path | str,
        input: str = "token_embeddings",
        mask: str = "attention_mask",
        output: str = "embedding",
        dim: int = 384,
    ) -> None:
        del model_dir  # nothing to read
        self.input = input
        self.mask = mask
        self.output = output
        self.dim = _positive("dim", dim)
        self.consumes: Sequence[Spec] = (
            Spec(input, "FP32", (-1, -1, self.dim)),
            Spec(mask, "INT64", (-1, -1)),
        )
        self.produces: Sequence[Spec] = (Spec(output, "FP32", (-1, self.dim)),)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        vectors = _tensor(tensors, self.input)
        mask = _tensor(tensors, self.mask)
        if vectors.ndim != 3 or vectors.shape[2] != self.dim:
            raise BadInput(
                f"input '{self.input}' must be [rows, tokens, {self.dim}], "
                f"got {list(vectors.shape)}"
            )
        if mask.ndim != 2 or mask.shape[0] != vectors.shape[0]:
            raise BadInput(
                f"input '{self.mask}' must be [{vectors.shape[0]}, tokens], got {list(mask.shape)}"
            )
        length = vectors.shape[1]
        if mask.shape[1] > length:
            if mask[:, length:].any():
                raise BadInput(
                    f"input '{self.mask}' marks tokens past the {length} of '{self.input}'"
                )
            mask = mask[:, :length]
        elif mask.shape[1] < length:
            mask = np.pad(mask, ((0, 0), (0, length - mask.shape[1])))
        weights = mask.astype(np.float32)[:, :, None]
        total = (vectors.astype(np.float32, copy=False) * weights).sum(axis=1)
        # The floor (as sentence-transformers uses) keeps a row with no unmasked token at zero
        # rather than NaN.
        count = np.maximum(weights.sum(axis=1), np.float32(1e-9))
        return {self.output: (total / count).astype(np.float32, copy=False)}


class Normalize:
    """FP32 [N, D] -> the same rows scaled to unit L2 norm (an all-zero row stays zero)."""

    def __init__(
        self,
        *,
        model_dir: Path | str,
        input: str = "embedding",
        output: str = "embedding",
        dim: int = 384,
    ) -> None:
        del model_dir  # nothing to read
        self.input = input
        self.output = output
        self.dim = _positive("dim", dim)
        self.consumes: Sequence[Spec] = (Spec(input, "FP32", (-1, self.dim)),)
        self.produces: Sequence[Spec] = (Spec(output, "FP32", (-1, self.dim)),)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        rows = _tensor(tensors, self.input)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise BadInput(
                f"input '{self.input}' must be [rows, {self.dim}], got {list(rows.shape)}"
            )
        rows = rows.astype(np.float32, copy=False)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return {self.output: rows / np.maximum(norms, np.float32(1e-12))}
