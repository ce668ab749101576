"""The PyTorch backend and decoders against transformers' own models and generate()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from sidecar.models.manifest import Task
from sidecar.runtime.backend import Decoder
from sidecar.runtime.pytorch import TorchBackend, TorchCausalDecoder, TorchSeq2SeqDecoder
from tests.checkpoints import CORPUS

NEW_TOKENS = 12
# Prompts of different lengths, so one step() mixes cache lengths.
TEXTS = ["Refund", CORPUS[0], CORPUS[4] + " " + CORPUS[5]]


def greedy(decoder: Decoder, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Argmax decoding through prefill and step, stopping after eos like generate() does."""
    logits, cache = decoder.prefill(prompt)
    out: list[int] = []
    while True:
        out.append(int(np.argmax(logits)))
        if out[-1] == eos or len(out) == max_new_tokens:
            return out
        rows, (cache,) = decoder.step([cache], [out[-1]])
        logits = rows[0]


def prompts(source: Path) -> list[list[int]]:
    """Token ids of TEXTS."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    return [list(tokenizer(text).input_ids) for text in TEXTS]


@pytest.fixture(scope="module")
def gpt2(gpt2_source: Path) -> tuple[TorchCausalDecoder, Any]:
    """The decoder and transformers' reference model for the tiny GPT-2."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_source).eval()
    return TorchCausalDecoder(gpt2_source, "cpu"), model


@pytest.fixture(scope="module")
def bart(bart_source: Path) -> tuple[TorchSeq2SeqDecoder, Any]:
    """The decoder and transformers' reference model for the tiny BART."""
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(bart_source).eval()
    start = model.generation_config.decoder_start_token_id
    return TorchSeq2SeqDecoder(bart_source, "cpu", decoder_start_token_id=start), model


def generated(model: Any, prompt: list[int], **options: Any) -> list[int]:
    """model.generate() greedy output ids (the prompt, or BART's start token, stripped)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=NEW_TOKENS,
            **options,
        )
    return list(out[0, 1 if model.config.is_encoder_decoder else len(prompt) :].tolist())


def test_gpt2_greedy_matches_generate(
    gpt2: tuple[TorchCausalDecoder, Any], gpt2_source: Path
) -> None:
    decoder, model = gpt2
    eos = model.generation_config.eos_token_id
    assert (decoder.name, decoder.device, decoder.dtype) == ("torch", "cpu", "float32")
    for prompt in prompts(gpt2_source):
        expected = generated(model, prompt, pad_token_id=eos)
        assert greedy(decoder, prompt, eos, NEW_TOKENS) == expected
    # Random weights never pick the real eos; stopping is checked on a token they do pick.
    stop = expected[NEW_TOKENS // 2]
    expected = generated(model, prompt, eos_token_id=stop, pad_token_id=stop)
    assert expected[-1] == stop
    assert len(expected) < NEW_TOKENS
    assert greedy(decoder, prompt, stop, NEW_TOKENS) == expected


def test_bart_greedy_matches_generate(
    bart: tuple[TorchSeq2SeqDecoder, Any], bart_source: Path
) -> None:
    decoder, model = bart
    config = model.generation_config
    # The checkpoint forces eos at max_length; the sidecar applies that rule itself, above
    # the decoder, so generate() runs without it. Nothing else alters greedy choices.
    assert config.forced_eos_token_id is not None
    assert not config.forced_bos_token_id
    assert not config.no_repeat_ngram_size
    assert not config.min_length
    assert not config.min_new_tokens
    for prompt in prompts(bart_source):
        expected = generated(model, prompt, forced_eos_token_id=None)
        assert greedy(decoder, prompt, config.eos_token_id, NEW_TOKENS) == expected


@pytest.mark.parametrize("which", ["gpt2", "bart"])
def test_step_of_several_sequences_equals_each_alone(
    which: str, request: pytest.FixtureRequest
) -> None:
    decoder, model = request.getfixturevalue(which)
    source: Path = request.getfixturevalue(f"{which}_source")
    batch = prompts(source)
    assert len({len(p) for p in batch}) == len(batch)  # lengths differ
    tokens = [p[-1] for p in batch]
    together, caches = decoder.step([decoder.prefill(p)[1] for p in batch], tokens)
    assert together.shape == (len(batch), model.config.vocab_size)
    assert together.dtype == np.float32
    # The caches step() returned go on: a second shared step still matches.
    again, _ = decoder.step(caches, tokens)
    for i, prompt in enumerate(batch):
        first, (cache,) = decoder.step([decoder.prefill(prompt)[1]], [tokens[i]])
        second, _ = decoder.step([cache], [tokens[i]])
        np.testing.assert_allclose(together[i], first[0], atol=1e-5)
        np.testing.assert_allclose(again[i], second[0], atol=1e-5)


def test_classify_logits_match_the_model_on_a_padded_batch(classifier_source: Path) -> None:
    backend = TorchBackend(classifier_source, Task.CLASSIFY, "cpu")
    assert backend.input_names == ("input_ids", "attention_mask", "token_type_ids")
    tokenizer = transformers.AutoTokenizer.from_pretrained(classifier_source)
    batch = tokenizer(CORPUS, padding=True, return_tensors="np")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_source)
    with torch.inference_mode():
        expected = model.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
    outputs = backend.run(dict(batch))
    assert list(outputs) == ["logits"]
    assert outputs["logits"].dtype == np.float32
    np.testing.assert_allclose(outputs["logits"], expected.numpy(), atol=1e-5)


def test_embed_hidden_states_match_the_model(minilm_source: Path) -> None:
    backend = TorchBackend(minilm_source, Task.EMBED, "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_source)
    batch = tokenizer(CORPUS, padding=True, return_tensors="np")
    model = transformers.AutoModel.from_pretrained(minilm_source).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    hidden = backend.run(dict(batch))["last_hidden_state"]
    assert hidden.shape == (len(CORPUS), batch["input_ids"].shape[1], 384)
    np.testing.assert_allclose(hidden, expected.numpy(), atol=1e-5)


def test_bfloat16_weights_give_float32_outputs(classifier_source: Path) -> None:
    backend = TorchBackend(classifier_source, Task.CLASSIFY, "cpu", dtype="bfloat16")
    reference = TorchBackend(classifier_source, Task.CLASSIFY, "cpu")
    assert (backend.dtype, reference.dtype) == ("bfloat16", "float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(classifier_source)
    batch = dict(tokenizer(CORPUS, padding=True, return_tensors="np"))
    logits = backend.run(batch)["logits"]
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference.run(batch)["logits"], atol=0.05)
