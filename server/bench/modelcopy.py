"""`--queue-size N`: a throw-away model repository whose model has `max_queue_size = N`.

The overload level needs a queue that fills at the load it offers, and the models under
`models/` are not the bench's to edit. So the bench writes a repository of its own in a
temporary folder: the model's folder with every file linked to the original, except
`model.toml`, which is rewritten with one line changed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ember.server.bench.errors import BenchError

CONFIG_NAME = "model.toml"

# `max_queue_size = 1024` (with any spacing and a trailing comment) inside a table.
_QUEUE_LINE = re.compile(r"^(?P<lead>\s*max_queue_size\s*=\s*)\d+(?P<tail>.*)$", re.MULTILINE)
_BATCHING_HEADER = re.compile(r"^\s*\[batching\]\s*(#.*)?$", re.MULTILINE)
_ANY_HEADER = re.compile(r"^\s*\[", re.MULTILINE)


def set_queue_size(toml_text: str, size: int) -> str:
    """`model.toml` text with `[batching] max_queue_size` set to `size`.

    Rewrites the existing line, or adds one right under `[batching]` when the table has none;
    raises BenchError when there is no `[batching]` table (a model that does not batch has no
    bounded queue to set), or when a `max_queue_size` line sits outside it."""
    if size < 1:
        raise BenchError(f"--queue-size must be at least 1, got {size}")
    header = _BATCHING_HEADER.search(toml_text)
    if header is None:
        raise BenchError(
            "--queue-size: the model has no [batching] table, so it has no bounded queue"
        )
    following = _ANY_HEADER.search(toml_text, header.end())
    table_end = following.start() if following else len(toml_text)
    lines = list(_QUEUE_LINE.finditer(toml_text))
    if any(not header.end() <= m.start() < table_end for m in lines) or len(lines) > 1:
        raise BenchError(
            "--queue-size: model.toml has max_queue_size outside [batching] or more than once"
        )
    if lines:
        (match,) = lines
        return (
            toml_text[: match.start()]
            + f"{match.group('lead')}{size}{match.group('tail')}"
            + toml_text[match.end() :]
        )
    return toml_text[: header.end()] + f"\nmax_queue_size = {size}" + toml_text[header.end() :]


def write_queue_copy(model_dir: Path, size: int, repository: Path) -> Path:
    """Copy `model_dir` into `repository` (which must exist) with `max_queue_size = size`;
    every other file is a symlink to the original (weights are not copied). Returns the new
    model folder; `repository` is what `ember serve --model-repository` then takes."""
    source = model_dir.resolve()
    target = repository / source.name
    target.mkdir()
    for entry in source.iterdir():
        if entry.name != CONFIG_NAME:
            (target / entry.name).symlink_to(entry)
    text = (source / CONFIG_NAME).read_text(encoding="utf-8")
    (target / CONFIG_NAME).write_text(set_queue_size(text, size), encoding="utf-8")
    return target
