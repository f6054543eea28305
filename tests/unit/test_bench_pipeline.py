"""The text-pipeline bench's pure parts: the sentence mix, which models it takes, the table."""

from __future__ import annotations

import io
from pathlib import Path

from ember.server.bench.options import BenchOptions
from ember.server.bench.pipeline import LENGTHS, Raw, Served, _report, sentences, text_input
from ember.server.config import load_model_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_mix_cycles_through_every_length_and_is_seeded() -> None:
    texts = sentences(len(LENGTHS) * 2, seed=1)
    assert [len(t.split()) for t in texts] == list(LENGTHS) * 2
    assert texts == sentences(len(LENGTHS) * 2, seed=1)
    assert texts != sentences(len(LENGTHS) * 2, seed=2)


def test_only_a_text_pipeline_model_takes_this_bench() -> None:
    assert text_input(load_model_config(ROOT / "models" / "minilm")) == "text"
    assert text_input(load_model_config(ROOT / "models" / "mlp")) is None
    assert text_input(load_model_config(ROOT / "models" / "resnet")) is None  # image bytes


def test_the_report_compares_each_level_with_the_raw_pipeline_at_its_batch() -> None:
    served = [Served(1, 30.0, 20.0, 90.0, 0, 1.0), Served(32, 12.0, 2000.0, 2100.0, 0, 15.6)]
    raw = [Raw(1, 40.0), Raw(16, 20.0)]
    out = io.StringIO()
    code = _report(BenchOptions(model="minilm"), served, raw, out)
    text = out.getvalue()
    assert code == 0
    assert "| 1 | 30.0 | 20.0 | 90.0 | 1.0 | 40.0 (batch 1) | 75.0% |" in text
    assert "| 32 | 12.0 | 2000.0 | 2100.0 | 15.6 | 20.0 (batch 16) | 60.0% |" in text
    assert "concurrency 32: 60.0% (NOT met)" in text
    failed = [Served(32, 12.0, 2000.0, 2100.0, 3, 16.0)]
    assert _report(BenchOptions(model="minilm"), failed, [Raw(16, 10.0)], io.StringIO()) == 1
