"""The result cache alone: keys from what the model sees, least recently used evicted first,
the byte bound held."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.config import Settings, load_settings
from sidecar.dataplane.result_cache import ResultCache, RowKey, entry_size, row_key
from sidecar.errors import ConfigError
from sidecar.tasks.tokenization import EncodedText

DIGEST = "sha256:" + "ab" * 32


def item(ids: list[int], types: list[int] | None = None, *, truncated: bool = False) -> EncodedText:
    return EncodedText(
        np.array(ids, dtype=np.int64),
        np.array(types or [0] * len(ids), dtype=np.int64),
        truncated,
    )


def key(*ids: int) -> RowKey:
    return row_key("m", DIGEST, "embed", item(list(ids)))


def row(value: float, width: int = 4) -> np.ndarray:
    return np.full(width, value, dtype=np.float32)


def test_the_key_is_what_the_model_sees() -> None:
    same = row_key("m", DIGEST, "embed", item([101, 7, 102], truncated=True))
    assert same == key(101, 7, 102)  # truncation is the caller's own, the row is not
    assert key(101, 7, 102) != key(101, 7, 8, 102)
    # A pair's second segment (rerank, zero-shot) is in its token type ids.
    assert row_key("m", DIGEST, "rerank", item([1, 2, 3], [0, 0, 1])) != row_key(
        "m", DIGEST, "rerank", item([1, 2, 3], [0, 1, 1])
    )
    assert row_key("other", DIGEST, "embed", item([1])) != key(1)
    assert row_key("m", "sha256:" + "cd" * 32, "embed", item([1])) != key(1)
    assert row_key("m", DIGEST, "classify", item([1])) != key(1)
    # ids [1, 0] with types [0, 0] and ids [1] with types [0, ...] never run together.
    assert key(1, 0) != key(1)


def test_get_returns_what_was_put_as_a_read_only_copy() -> None:
    cache = ResultCache(10_000)
    source = row(1.5)
    cache.put(key(1), source)
    source[:] = 0  # the caller's array is its own
    found = cache.get(key(1))
    assert found is not None
    np.testing.assert_array_equal(found, row(1.5))
    with pytest.raises(ValueError, match="read-only"):
        found[0] = 2.0
    assert cache.get(key(2)) is None


def test_a_view_into_a_batch_is_kept_without_the_batch() -> None:
    batch = np.ones((64, 384), dtype=np.float32)
    cache = ResultCache(1 << 20)
    cache.put(key(1), batch[3])
    found = cache.get(key(1))
    assert found is not None
    assert found.base is None
    assert found.nbytes == 384 * 4


def test_the_least_recently_used_is_evicted_within_the_bound() -> None:
    size = entry_size(key(1), row(0))
    cache = ResultCache(3 * size)
    for i in range(1, 4):
        cache.put(key(i), row(i))
    assert cache.get(key(1)) is not None  # now the most recent
    cache.put(key(4), row(4))
    assert cache.get(key(2)) is None
    assert [cache.get(key(i)) is not None for i in (1, 3, 4)] == [True, True, True]
    assert cache.bytes == 3 * size == cache.max_bytes
    assert len(cache) == 3


def test_a_replaced_entry_counts_once_and_an_oversized_one_is_not_kept() -> None:
    cache = ResultCache(2 * entry_size(key(1), row(0)))
    cache.put(key(1), row(1))
    cache.put(key(1), row(2))
    assert cache.bytes == entry_size(key(1), row(0))
    found = cache.get(key(1))
    assert found is not None
    assert found[0] == 2
    cache.put(key(2), row(0, width=10_000))  # larger than the whole bound
    assert cache.get(key(2)) is None
    assert cache.get(key(1)) is not None


def test_entries_of_different_sizes_evict_as_many_as_needed() -> None:
    small = entry_size(key(1), row(0))
    cache = ResultCache(4 * small)
    for i in range(1, 5):
        cache.put(key(i), row(i))
    # An entry of two and a half small ones: three small ones must go to make room.
    wide = row(9, width=(5 * small // 2 - (small - 16)) // 4)
    assert 2 * small < entry_size(key(9), wide) <= 3 * small
    cache.put(key(9), wide)
    assert cache.bytes <= cache.max_bytes
    assert [cache.get(key(i)) is None for i in (1, 2, 3)] == [True, True, True]
    assert cache.get(key(4)) is not None
    assert cache.get(key(9)) is not None


def test_the_setting_comes_from_flags_and_env_and_is_never_negative(tmp_path: Path) -> None:
    assert Settings().result_cache_bytes == 0  # off by default
    env = {"SIDECAR_MODELS": str(tmp_path), "SIDECAR_RESULT_CACHE_BYTES": "1048576"}
    assert load_settings({}, env=env).result_cache_bytes == 1 << 20
    assert load_settings({"result_cache_bytes": "4096"}, env=env).result_cache_bytes == 4096
    with pytest.raises(ConfigError, match="'result_cache_bytes' must not be negative"):
        load_settings({"result_cache_bytes": -1}, env=env)
