"""Importing `module:Name` from a model folder or the installed packages (no torch here: the
transformer process imports its steps through this too)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


class LoadError(Exception):
    """Weights or code that could not be loaded; the message is one line naming the model."""


def import_object(path: str, model_dir: Path) -> Any:
    """`module:Name`, where module is a file in the model folder or an importable module.

    A module from the model folder gets a private name, so two models may both ship `model.py`;
    it is executed once, so the classes a model's steps and architecture take from one file
    share that file's module.
    """
    module_name, _, attr = path.partition(":")
    local = model_dir / (module_name.replace(".", "/") + ".py")
    module: ModuleType
    if local.is_file():
        private = f"ember_model_{abs(hash(str(local)))}_{module_name.replace('.', '_')}"
        known = sys.modules.get(private)
        if known is not None:
            module = known
        else:
            spec = importlib.util.spec_from_file_location(private, local)
            if spec is None or spec.loader is None:
                raise LoadError(f"cannot import {local}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[private] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                # A file that fails half-way is not kept: the next load runs it again.
                del sys.modules[private]
                raise
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise LoadError(f"cannot import '{module_name}' (for '{path}'): {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise LoadError(f"{module_name} has no attribute '{attr}'") from None
