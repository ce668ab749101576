"""Architectures that broke the export before: Gemma and Gemma 2 (no position ids in optimum's
graphs, so batched decoding read padded sequences at the wrong positions), Marian (a
SentencePiece tokenizer without a fast version), bare encoders (no pooling named). Each
exports with default settings and serves what transformers computes."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from export.pipeline import export_model
from export.progress import Progress
from sidecar.config import ModelSettings
from sidecar.models.manifest import read_manifest
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.checkpoints import build_bare_encoder, build_gemma, build_marian
from tests.conftest import channel_to, local_settings, serving

pytestmark = pytest.mark.slow

PROMPTS = [
    "Refund request: order 1234 never arrived.",
    "The app crashes when I open the settings page.",
    "Café, naïve, façade",
]
# Tiny random models repeat a token under greedy decoding; a penalty (which the sidecar and
# generate() apply alike) makes the replies vary, so a wrong step shows.
PENALTY = 1.3
NEW_TOKENS = 16


def export_noting(source: Path, out: Path) -> tuple[Path, str]:
    """Export with default settings; return the dir and the progress printed."""
    printed = io.StringIO()
    export_model(str(source), out, progress=Progress(5, printed))
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    built = {
        "gemma": build_gemma(root / "gemma", "gemma"),
        "gemma2": build_gemma(root / "gemma2", "gemma2"),
        "marian": build_marian(root / "marian"),
    }
    for kind in ("bert", "xlm-roberta", "modernbert"):
        built[kind] = build_bare_encoder(root / kind, kind)
    return built


@pytest.fixture(scope="module")
def exports(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("models")
    return {name: export_noting(source, root / name) for name, source in sources.items()}


@pytest.fixture(scope="module")
async def stub(exports: dict[str, tuple[Path, str]]) -> AsyncIterator[InferenceStub]:
    models = [ModelSettings(path=path, name=name) for name, (path, _) in exports.items()]
    async with serving(local_settings(*models)) as server, channel_to(server) as channel:
        yield InferenceStub(channel)


def reference_replies(source: Path, seq2seq: bool) -> list[list[int]]:
    """generate()'s greedy replies with PENALTY, new tokens only (an EOS included, as the
    sidecar sends it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = model_class.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    replies = []
    for prompt in PROMPTS:
        encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                repetition_penalty=PENALTY,
            )
        start = 1 if seq2seq else encoded["input_ids"].shape[1]  # the decoder start token
        replies.append(out[0, start:].tolist())
    return replies


async def served_replies(stub: InferenceStub, model: str) -> list[list[int]]:
    async def one(prompt: str) -> list[int]:
        request = pb.GenerateRequest(
            model=model,
            prompt=prompt,
            max_new_tokens=NEW_TOKENS,
            temperature=0,
            repetition_penalty=PENALTY,
        )
        return [t async for step in stub.Generate(request, timeout=60) for t in step.token_ids]

    # At once, so the prompts of different lengths share padded decoding steps.
    return list(await asyncio.gather(*[one(p) for p in PROMPTS]))


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
async def test_gemma_decodes_in_batched_steps_as_transformers(
    name: str, sources: dict[str, Path], exports: dict[str, tuple[Path, str]], stub: InferenceStub
) -> None:
    model_dir, _ = exports[name]
    from export.validate_generation import Graph

    assert Graph(model_dir / "model.onnx").takes_positions  # added to optimum's config
    stages = [case["stage"] for case in read_manifest(model_dir).validation.cases]  # type: ignore[union-attr]
    assert "batched cached step" in stages
    expected = reference_replies(sources[name], seq2seq=False)
    assert await served_replies(stub, name) == expected
    assert len({t for reply in expected for t in reply}) > 3  # the replies do vary


async def test_marian_gets_a_tokenizer_json_and_translates_as_transformers(
    sources: dict[str, Path], exports: dict[str, tuple[Path, str]], stub: InferenceStub
) -> None:
    model_dir, printed = exports["marian"]
    assert (model_dir / "tokenizer.json").is_file()
    manifest = read_manifest(model_dir)
    assert manifest.generation is not None
    pad = manifest.generation.decoder_start_token_id
    assert manifest.generation.suppressed_token_ids == (pad,)  # bad_words_ids, as generate()
    assert "beam search (num_beams 4)" in printed
    # The tokenizer.json built from source.spm and vocab.json gives MarianTokenizer's ids.
    from tokenizers import Tokenizer
    from transformers import MarianTokenizer

    slow = MarianTokenizer.from_pretrained(sources["marian"])
    built = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # German words in English text: pieces only the target side has must not be produced;
    # a letter English lacks (ü) is looked up in vocab.json whole, as MarianTokenizer does.
    mixed = ["My Bestellung never angekommen.", "Rückerstattung please", "Passwort zurück"]
    for text in [*PROMPTS, *mixed, "  two  spaces </s> and <unk> ", "Die Rechnung ist falsch."]:
        assert built.encode(text).ids == slow(text)["input_ids"], text
    replies = await served_replies(stub, "marian")
    assert replies == reference_replies(sources["marian"], seq2seq=True)
    assert all(pad not in reply for reply in replies)


def test_marian_for_the_pytorch_backend_gets_the_same_tokenizer_json(
    sources: dict[str, Path], exports: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    out = tmp_path / "marian-torch"
    export_model(str(sources["marian"]), out, backend="torch", progress=Progress(5, io.StringIO()))
    onnx_dir, _ = exports["marian"]
    assert (out / "tokenizer.json").read_bytes() == (onnx_dir / "tokenizer.json").read_bytes()
    assert read_manifest(out).weights == ("model.safetensors",)


@pytest.mark.parametrize("name", ["bert", "xlm-roberta", "modernbert"])
async def test_bare_encoders_embed_with_mean_pooling(
    name: str, sources: dict[str, Path], exports: dict[str, tuple[Path, str]], stub: InferenceStub
) -> None:
    from transformers import AutoModel, AutoTokenizer

    model_dir, printed = exports[name]
    assert "names no pooling" in printed
    assert "embeddings are the mean of the token vectors" in printed
    manifest = read_manifest(model_dir)
    assert manifest.pooling is not None
    assert (manifest.pooling.mode, manifest.pooling.normalize) == ("mean", False)
    reply = await stub.Embed(pb.EmbedRequest(model=name, inputs=PROMPTS), timeout=30)
    got = np.asarray([e.values for e in reply.embeddings])
    model = AutoModel.from_pretrained(sources[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(sources[name])
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
