"""Sampling, streamed text and chat rendering against transformers' own implementations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sidecar.domain import ChatMessage, GenerateRequest
from sidecar.errors import InvalidInputError
from sidecar.generation.chat import ChatTemplate
from sidecar.generation.sampling import Sampler, SamplingParams, resolve
from sidecar.generation.text import TextStream
from sidecar.models.manifest import GenerationDefaults
from sidecar.serving.generative import special_tokens

VOCAB = 64


def params(**changes: object) -> SamplingParams:
    base = dict(
        max_new_tokens=16,
        greedy=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        stop=(),
        seed=0,
        eos_token_ids=(1,),
    )
    return SamplingParams(**{**base, **changes})  # type: ignore[arg-type]


def logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


def reference_scores(processors: list[object], scores: np.ndarray, ids: list[int]) -> np.ndarray:
    tensor = torch.tensor(scores)[None, :]
    input_ids = torch.tensor([ids])
    for processor in processors:
        tensor = processor(input_ids, tensor)  # type: ignore[operator]
    return tensor[0].numpy()


def test_greedy_with_repetition_penalty_and_ngrams_matches_transformers() -> None:
    context = [3, 7, 3, 9, 3, 7]
    for seed in range(20):
        scores = logits(seed)
        expected = reference_scores(
            [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2)],
            scores,
            context,
        )
        chosen = Sampler(params(repetition_penalty=1.3, no_repeat_ngram_size=2)).choose(
            scores, context, generated=3
        )
        assert chosen == int(np.argmax(expected))
        assert chosen != 7  # "3 7" already appeared, and the context ends with 3


def test_sampling_keeps_the_tokens_transformers_warpers_keep() -> None:
    scores = logits(1)
    kept = reference_scores(
        [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)], scores, [2]
    )
    allowed = set(np.flatnonzero(np.isfinite(kept)).tolist())
    sampler = Sampler(params(greedy=False, temperature=0.7, top_k=20, top_p=0.8, seed=5))
    drawn = {sampler.choose(scores, [2], generated=1) for _ in range(400)}
    assert drawn <= allowed
    assert len(drawn) > 1  # it does sample


def test_a_seed_reproduces_the_draws_and_another_seed_differs() -> None:
    def draws(seed: int) -> list[int]:
        sampler = Sampler(params(greedy=False, seed=seed))
        return [sampler.choose(logits(i), [2], generated=i) for i in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_min_new_tokens_and_forced_tokens() -> None:
    scores = np.zeros(VOCAB, dtype=np.float32)
    scores[1] = 10.0  # eos is by far the most likely
    early = Sampler(params(min_new_tokens=2))
    assert early.choose(scores, [0], generated=1) != 1
    assert early.choose(scores, [0], generated=2) == 1
    forced = Sampler(params(forced_bos_token_id=5, forced_eos_token_id=6, max_new_tokens=4))
    assert forced.choose(scores, [0], generated=0) == 5
    assert forced.choose(scores, [0], generated=3) == 6


def test_suppressed_tokens_are_never_chosen_as_generate_never_chooses_them() -> None:
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    scores = logits(3)
    best = int(np.argmax(scores))
    greedy = Sampler(params(suppressed_token_ids=(best,)))
    expected = reference_scores([NoBadWordsLogitsProcessor([[best]], eos_token_id=1)], scores, [0])
    assert greedy.choose(scores, [0], generated=0) == int(np.argmax(expected)) != best
    top = tuple(int(i) for i in np.argsort(-scores)[:3])
    sampler = Sampler(params(greedy=False, suppressed_token_ids=top, seed=7))
    assert not {sampler.choose(scores, [0], generated=0) for _ in range(200)} & set(top)
    defaults = GenerationDefaults.from_json({"suppressed_token_ids": [best]})
    assert resolve(GenerateRequest("m", "x"), defaults).suppressed_token_ids == (best,)


def test_resolve_fills_defaults_and_refuses_bad_values() -> None:
    defaults = GenerationDefaults(max_new_tokens=40, do_sample=True, temperature=0.9, top_p=0.95)
    filled = resolve(GenerateRequest(model="m", prompt="x"), defaults)
    assert (filled.max_new_tokens, filled.greedy, filled.temperature, filled.top_p) == (
        40,
        False,
        0.9,
        0.95,
    )
    assert resolve(GenerateRequest(model="m", prompt="x", temperature=0.0), defaults).greedy
    bad = [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "finite"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop sequences"),
    ]
    for change, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            resolve(GenerateRequest(model="m", prompt="x", **change), defaults)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_source: Path) -> Tokenizer:
    return Tokenizer.from_file(str(gpt2_source / "tokenizer.json"))


def stream_all(tokenizer: Tokenizer, ids: list[int], stops: tuple[str, ...] = ()) -> list[str]:
    stream = TextStream(tokenizer, stops)
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            return deltas
    deltas.append(stream.finish())
    return deltas


def test_deltas_join_to_the_decoded_text_across_multibyte_characters(
    gpt2_tokenizer: Tokenizer,
) -> None:
    text = "Café déjà vu — 東京 🚀 refund!"
    ids = gpt2_tokenizer.encode(text).ids
    deltas = stream_all(gpt2_tokenizer, ids)
    assert "".join(deltas) == gpt2_tokenizer.decode(ids) == text
    # A character split over byte tokens arrives whole, in one delta, never as U+FFFD.
    assert any(d == "" for d in deltas)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_sequences_end_the_text_before_them_even_across_tokens(
    gpt2_tokenizer: Tokenizer,
) -> None:
    ids = gpt2_tokenizer.encode("Refund request: order 1234 never arrived.").ids
    deltas = stream_all(gpt2_tokenizer, ids, stops=("1234",))
    assert "".join(deltas) == "Refund request: order "
    # Text that might begin a stop sequence is held back until it cannot.
    partial = stream_all(gpt2_tokenizer, ids, stops=("order 9",))
    assert "".join(partial) == "Refund request: order 1234 never arrived."


def test_an_incomplete_character_at_the_end_shows_as_the_full_decode_does(
    gpt2_tokenizer: Tokenizer,
) -> None:
    ids = gpt2_tokenizer.encode("ok 🚀").ids[:-1]  # cut inside the emoji's bytes
    assert "".join(stream_all(gpt2_tokenizer, ids)) == gpt2_tokenizer.decode(ids)


def test_chat_template_renders_as_transformers_does(gpt2_source: Path) -> None:
    messages = [
        ChatMessage("system", "You triage tickets."),
        ChatMessage("user", "My invoice is wrong."),
    ]
    template = ChatTemplate(
        (gpt2_source / "chat_template.jinja").read_text(), special_tokens(gpt2_source)
    )
    reference = AutoTokenizer.from_pretrained(gpt2_source).apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert template.render(messages) == reference
    with pytest.raises(InvalidInputError, match="role"):
        template.render([ChatMessage("robot", "hi")])


def test_a_template_that_refuses_a_conversation_is_a_client_error() -> None:
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}"
        "{% endif %}{{ messages[0]['content'] }}",
        {},
    )
    with pytest.raises(InvalidInputError, match="first turn must be user"):
        strict.render([ChatMessage("assistant", "hi")])


def test_extreme_values_never_break_sampling() -> None:
    scores = logits(3)
    best = int(np.argmax(scores))
    # A tiny temperature (or penalty) scales past float32; the choice collapses to the best.
    tiny = Sampler(params(greedy=False, temperature=1e-39, seed=1))
    assert {tiny.choose(scores, [2], generated=0) for _ in range(20)} == {best}
    penalised = Sampler(params(greedy=False, repetition_penalty=1e-30, seed=1))
    penalised.choose(scores, [best], generated=0)
    # NaN from the model (an fp16 overflow) is never chosen, greedy or sampled.
    broken = scores.copy()
    broken[5] = np.nan
    assert Sampler(params()).choose(broken, [2], generated=0) != 5
    assert Sampler(params(greedy=False, seed=2)).choose(broken, [2], generated=0) != 5


def test_forced_bos_only_after_a_single_decoder_token() -> None:
    scores = logits(4)
    forced = Sampler(params(forced_bos_token_id=5))
    assert forced.choose(scores, [0], generated=0) == 5  # seq2seq: just the start token
    assert forced.choose(scores, [0, 9, 9], generated=0) == int(np.argmax(scores))


def test_chat_tojson_and_generation_blocks_render_as_transformers() -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    source = (
        "{% for m in messages %}{{ m['content'] | tojson }}"
        "{% generation %}[{{ m['role'] }}]{% endgeneration %}{% endfor %}"
    )
    messages = [ChatMessage("user", "it's <b> & é")]
    expected = _compile_jinja_template(source).render(
        messages=[{"role": "user", "content": "it's <b> & é"}], add_generation_prompt=True
    )
    assert ChatTemplate(source, {}).render(messages) == expected == '"it\'s <b> & é"[user]'


def test_the_format_wins_when_the_processors_rule_out_every_token_it_allows() -> None:
    suppressing = params(eos_token_ids=(0,), suppressed_token_ids=(2, 3))
    scores = np.array([5.0, 4.0, 1.0, 0.5, 3.0], dtype=np.float32)
    allowed = np.array([False, False, True, True, False])
    assert Sampler(suppressing).choose(scores, [1], 0, allowed) == 2
    assert Sampler(suppressing).choose(scores, [1], 0) == 0
