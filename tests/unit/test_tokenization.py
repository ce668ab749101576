"""TextEncoder on the bundled MiniLM tokenizer: padding, truncation, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sidecar.errors import InvalidInputError, ModelLoadError
from sidecar.tasks.tokenization import TextEncoder


@pytest.fixture(scope="module")
def encoder(minilm_source: Path) -> TextEncoder:
    return TextEncoder(minilm_source, max_length=16)


def test_pads_to_the_longest_with_the_pad_id(encoder: TextEncoder) -> None:
    batch = encoder.encode(["hello", "hello big wide world"], truncate=True)
    assert batch.input_ids.shape == (2, 6)
    assert batch.token_counts == [3, 6]
    np.testing.assert_array_equal(batch.attention_mask[0], [1, 1, 1, 0, 0, 0])
    assert (batch.input_ids[0, 3:] == encoder.pad_id).all()
    assert encoder.pad_id == 0  # [PAD] in BERT vocabularies


def test_truncation_keeps_special_tokens(encoder: TextEncoder) -> None:
    batch = encoder.encode(["word " * 40, "short"], truncate=True)
    assert batch.truncated == [True, False]
    assert batch.token_counts[0] == 16
    assert batch.input_ids[0, 0] == 101
    assert batch.input_ids[0, 15] == 102


def test_overlong_without_truncation_names_index_and_length(encoder: TextEncoder) -> None:
    with pytest.raises(
        InvalidInputError, match=r"inputs\[1\] is 42 tokens, over the model's limit of 16"
    ):
        encoder.encode(["fine", "word " * 40], truncate=False)


def test_tokenize_reports_truncation_only_when_asked(encoder: TextEncoder) -> None:
    full = encoder.tokenize(["word " * 40], add_special_tokens=True, truncate=False)[0]
    cut = encoder.tokenize(["word " * 40], add_special_tokens=True, truncate=True)[0]
    assert (len(full.ids), full.truncated) == (42, False)
    assert (len(cut.ids), cut.truncated) == (16, True)


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no tokenizer.json"):
        TextEncoder(tmp_path, 8)


def test_pad_token_from_config_when_tokenizer_config_has_none(
    minilm_source: Path, tmp_path: Path
) -> None:
    shutil.copy(minilm_source / "tokenizer.json", tmp_path)
    (tmp_path / "config.json").write_text('{"pad_token_id": 7}')
    assert TextEncoder(tmp_path, 8).pad_id == 7
    (tmp_path / "config.json").write_text("{}")
    assert TextEncoder(tmp_path, 8).pad_id is None
