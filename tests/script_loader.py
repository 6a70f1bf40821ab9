"""Load a project script (``train/*.py``, ``scripts/*.py``) as a module, for tests that call its functions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``name`` is the script's path from the repository root, e.g. ``"scripts/bench_eager.py"``."""
    spec = importlib.util.spec_from_file_location(name.replace("/", "_").removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
