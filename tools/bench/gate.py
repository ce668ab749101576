"""The check before any timing: every target embeds like sentence-transformers does.

A server that pools, truncates or normalizes differently would do less work and look
faster, so each target (the sidecar too) embeds a sample of the corpus that holds its
longest texts, one text per call over its own API, and each vector is compared with
`SentenceTransformer(checkpoint).encode()` (which for this model mean-pools, truncates at its
`max_seq_length` and normalizes). Below MIN_COSINE on any text the bench stops, naming the
target and its lowest cosine.

    python -m tools.bench.gate --checkpoint DIR --texts sample.json   (the reference vectors)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from tools.bench.processes import run_child

MIN_COSINE = 0.999


def sample(texts: list[str], tokenizer_file: Path, longest: int, others: int) -> list[str]:
    """The `longest` texts by token count and `others` spread over the rest of the corpus."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    rest = order[longest:]
    step = max(len(rest) // max(others, 1), 1)
    return [texts[i] for i in order[:longest] + rest[::step][:others]]


def reference(checkpoint: Path, sample_file: Path) -> npt.NDArray[np.float32]:
    """sentence-transformers' vectors for the sample, computed in a child process.

    A child, so torch never loads into the bench process that times the in-process ceiling.
    """
    command = [sys.executable, "-m", "tools.bench.gate", "--checkpoint", str(checkpoint)]
    command += ["--texts", str(sample_file)]
    out = run_child(command, "sentence-transformers' reference embeddings", 600)
    return _unit(np.asarray(json.loads(out), dtype=np.float32))


def _unit(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = x / np.maximum(norms, 1e-12)
    return unit


def check(
    name: str, target: str, sample_file: Path, expected: npt.NDArray[np.float32]
) -> dict[str, Any]:
    """The target's min and mean cosine to the reference; the bench stops below MIN_COSINE."""
    command = [sys.executable, "-m", "tools.bench.load", "--target", target, "--vectors"]
    command += ["--corpus", str(sample_file)]
    out = run_child(command, f"{name}'s answers to the embedding check", 600)
    got = np.asarray(json.loads(out), dtype=np.float32)
    if got.shape != expected.shape:
        raise SystemExit(f"{name} answered vectors of shape {got.shape}, expected {expected.shape}")
    cosines = np.sum(_unit(got) * expected, axis=1)
    worst = int(np.argmin(cosines))
    low = float(cosines[worst])
    print(f"  {name:<22} cosine to sentence-transformers: min {low:.6f}", flush=True)
    if not low >= MIN_COSINE:  # NaN fails too
        texts = json.loads(sample_file.read_text())
        raise SystemExit(
            f"{name} embeds unlike sentence-transformers: min cosine {low:.6f} < {MIN_COSINE} "
            f"(sample text {worst}, {len(texts[worst].split())} words); it pools, truncates or "
            "normalizes differently, so it is refused rather than timed"
        )
    return {"cosine_min": low, "cosine_mean": float(np.mean(cosines)), "texts": len(cosines)}


def main() -> None:
    """Print sentence-transformers' embeddings of a JSON list of texts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--texts", type=Path, required=True)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(args.checkpoint), device="cpu")
    texts = json.loads(args.texts.read_text())
    vectors = model.encode(texts, batch_size=16, convert_to_numpy=True)
    print(json.dumps(np.asarray(vectors).tolist()))


if __name__ == "__main__":
    main()
