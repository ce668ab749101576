"""Tokenize over gRPC against the checkpoint's own transformers tokenizer."""

from __future__ import annotations

from pathlib import Path

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub

TEXTS = ["Refund not received!", "Café 東京 🚀 déjà-vu", "word " * 300]


async def test_ids_and_offsets_match_transformers(
    inference: InferenceStub, minilm_source: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_source)
    response = await inference.Tokenize(pb.TokenizeRequest(inputs=TEXTS))
    assert response.max_length == 256
    for text, tokens in zip(TEXTS, response.results, strict=True):
        expected = tokenizer(text, return_offsets_mapping=True)
        assert list(tokens.ids) == expected["input_ids"]
        assert list(tokens.tokens) == tokenizer.convert_ids_to_tokens(expected["input_ids"])
        assert [(s.start, s.end) for s in tokens.offsets] == expected["offset_mapping"]
        assert tokens.token_count == len(expected["input_ids"])
        assert not tokens.truncated


async def test_offsets_are_code_points(inference: InferenceStub) -> None:
    text = "東京 café"
    response = await inference.Tokenize(pb.TokenizeRequest(inputs=[text], add_special_tokens=False))
    spans = [text[s.start : s.end] for s in response.results[0].offsets]
    assert spans[:2] == ["東", "京"]
    assert "".join(spans[2:]) == "café"


async def test_special_tokens_and_truncation_switches(inference: InferenceStub) -> None:
    plain = await inference.Tokenize(
        pb.TokenizeRequest(inputs=["hello world"], add_special_tokens=False)
    )
    assert list(plain.results[0].tokens) == ["hello", "world"]
    cut = await inference.Tokenize(pb.TokenizeRequest(inputs=[TEXTS[2]], truncate=True))
    assert (cut.results[0].token_count, cut.results[0].truncated) == (256, True)
    assert list(cut.results[0].tokens)[-1] == "[SEP]"
