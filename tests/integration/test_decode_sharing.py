"""Shared decode steps: the same company of sequences feeds its last step's presents back as
they are (no re-packing), with the logits each sequence gets alone; the scheduler keeps the
generations that just stepped together in the next step, over Generate and over Stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from sidecar.config import ModelSettings
from sidecar.runtime.onnx_decoder import OnnxCausalDecoder
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, local_settings, serving, token_ids

pytestmark = pytest.mark.slow

PROMPTS = [
    "Refund request: order 1234 never arrived.",
    "The app crashes when I open the settings page, every single time since the update.",
    "Café",
]
Logits = npt.NDArray[np.float32]


def _ids(count: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(5, 300, count)]


def _recorded(decoder: Any, patch: pytest.MonkeyPatch) -> list[int]:
    """The number of sequences of every step the decoder runs from now on."""
    sizes: list[int] = []
    step = decoder.step

    def counted(caches: Sequence[Any], tokens: Sequence[int]) -> Any:
        sizes.append(len(caches))
        return step(caches, tokens)

    patch.setattr(decoder, "step", counted)
    return sizes


@pytest.fixture(scope="module")
def decoder(gpt2_dir: Path) -> OnnxCausalDecoder:
    return OnnxCausalDecoder(gpt2_dir / "model.onnx", "cpu", 1)


def test_the_same_company_feeds_its_presents_back_uncopied(
    decoder: OnnxCausalDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches = [decoder.prefill(_ids(n, n))[1] for n in (5, 9, 14)]
    _, caches = decoder.step(caches, [7, 8, 9])  # a new company: packed once
    fed: list[dict[str, Any]] = []
    run = decoder._model.run

    def seen(inputs: dict[str, Any]) -> Any:
        fed.append(dict(inputs))
        return run(inputs)

    monkeypatch.setattr(decoder._model, "run", seen)
    # In another order, as the scheduler may ask: the rows stay where they are.
    order = [2, 0, 1]
    rows, stepped = decoder.step([caches[i] for i in order], [9, 7, 8])
    name = "past_key_values.0.key"
    assert fed[-1][name] is caches[0].batch[name]
    assert [c.length for c in stepped] == [16, 7, 11]
    # Each row's logits are its own sequence's, as when stepped alone.
    for row, i in enumerate(order):
        alone, _ = decoder.step([caches[i]], [[7, 8, 9][i]])
        np.testing.assert_allclose(rows[row], alone[0], atol=1e-5)
    # A sequence leaving is a new company: the others are packed anew, to their own width.
    left, _ = decoder.step(stepped[1:], [1, 2])
    assert fed[-1][name] is not stepped[1].batch[name]
    assert fed[-1][name].shape[2] == 11
    assert left.shape[0] == 2


def _repacked_step(
    decoder: OnnxCausalDecoder, pasts: list[dict[str, Any]], tokens: list[int]
) -> tuple[Logits, list[dict[str, Any]]]:
    """The step as it was before caches stayed packed: every past left-padded anew."""
    lengths = [next(iter(p.values())).shape[2] for p in pasts]
    width = max(lengths)
    packed = {}
    for name in pasts[0]:
        first = pasts[0][name]
        batch = np.zeros((len(pasts), first.shape[1], width, first.shape[3]), first.dtype)
        for row, past in enumerate(pasts):
            batch[row, :, width - lengths[row] :, :] = past[name][0]
        packed[name] = batch
    mask = np.zeros((len(pasts), width + 1), np.int64)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    logits, outputs = decoder._run(
        np.asarray(tokens, np.int64)[:, None],
        mask,
        np.asarray(lengths, np.int64)[:, None],
        packed,
    )
    presents = [
        {
            name: outputs["present." + name.split(".", 1)[1]][row : row + 1, :, width - n :, :]
            for name in pasts[0]
        }
        for row, n in enumerate(lengths)
    ]
    return logits, presents


def test_greedy_tokens_as_before_while_sequences_join_and_leave(
    decoder: OnnxCausalDecoder,
) -> None:
    """Sequences join at steps 0, 3 and 6 and one leaves at step 10: each gets the tokens the
    re-packing step gave and the logits it gets alone."""
    prompts = {"a": _ids(6, 1), "b": _ids(13, 2), "c": _ids(3, 3)}
    joins, leaves = {"a": 0, "b": 3, "c": 6}, {"b": 10}
    new: dict[str, Any] = {}  # name: [cache, last token, tokens]
    old: dict[str, Any] = {}
    alone: dict[str, Any] = {}
    for step in range(16):
        for name, at in joins.items():
            if at == step:
                logits, cache = decoder.prefill(prompts[name])
                token = int(logits.argmax())
                new[name] = [cache, token, [token]]
                old[name] = [cache.past, token, [token]]
                alone[name] = [cache, token, [token]]
        for name, at in leaves.items():
            if at == step:
                del new[name], old[name]
        names = list(new)
        rows, caches = decoder.step([new[n][0] for n in names], [new[n][1] for n in names])
        before, pasts = _repacked_step(
            decoder, [old[n][0] for n in names], [old[n][1] for n in names]
        )
        for row, name in enumerate(names):
            solo, (alone_cache,) = decoder.step([alone[name][0]], [alone[name][1]])
            np.testing.assert_allclose(rows[row], solo[0], atol=1e-4)
            np.testing.assert_allclose(rows[row], before[row], atol=1e-5)
            token = int(rows[row].argmax())
            new[name] = [caches[row], token, [*new[name][2], token]]
            token = int(before[row].argmax())
            old[name] = [pasts[row], token, [*old[name][2], token]]
            token = int(solo[0].argmax())
            alone[name] = [alone_cache, token, [*alone[name][2], token]]
    for name in new:
        assert new[name][2] == old[name][2] == alone[name][2]


async def _generate_together(
    model: Any, scheduler: Any, prompts: list[str], tokens: int
) -> list[list[int]]:
    """Generations driven by Generation's own driver: the next step asked for on each answer."""
    from sidecar.dataplane.generation import _Steps
    from sidecar.domain import GenerateRequest
    from sidecar.generation.sampling import resolve

    async def one(prompt: str) -> list[int]:
        request = GenerateRequest(model="gpt2", prompt=prompt, max_new_tokens=tokens)
        sequence = model.sequence(model.prompt(request, tokens), resolve(request, model.defaults))
        steps = _Steps(scheduler, sequence)
        ids: list[int] = []
        try:
            while True:
                chunk = await steps.next()
                ids += chunk.token_ids
                if chunk.finish is not None:
                    return ids
        finally:
            steps.close()

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def test_generations_that_stepped_together_step_together_again(
    gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three generations started at once share every step once all three are prefilled (a
    job cut before the last step's generations asked again split them into two groups that
    took turns for good)."""
    from sidecar.generation.scheduler import DecodeScheduler
    from sidecar.models.manifest import read_manifest
    from sidecar.serving.loader import load_model

    model: Any = load_model("gpt2", gpt2_dir, read_manifest(gpt2_dir), "cpu", 1)
    sizes = _recorded(model.decoder, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        scheduler = DecodeScheduler("gpt2", model.decoder, pool, asyncio.Semaphore(1), 8)
        together = await _generate_together(model, scheduler, PROMPTS, 16)
        await scheduler.close()
    # Until the first one ends (EOS may come early), every step after the prefills is shared.
    shortest = min(len(ids) for ids in together)
    shared = sizes[sizes.index(3) :][: shortest - 3]
    assert shared, sizes
    assert set(shared) == {3}, sizes


@pytest.fixture(scope="module")
async def server(gpt2_dir: Path) -> AsyncIterator[SidecarServer]:
    async with serving(local_settings(ModelSettings(path=gpt2_dir, name="gpt2"))) as started:
        yield started


async def _stream_generations(
    stub: InferenceStub, requests: list[pb.GenerateRequest]
) -> dict[str, list[pb.GenerateResponse]]:
    async def items() -> AsyncIterator[pb.StreamRequest]:
        for number, request in enumerate(requests):
            yield pb.StreamRequest(id=str(number), generate=request)

    answers: dict[str, list[pb.GenerateResponse]] = {}
    async for response in stub.Stream(items(), timeout=60):
        assert response.WhichOneof("response") == "generate", response
        answers.setdefault(response.id, []).append(response.generate)
    return answers


@pytest.mark.parametrize("transport", ["Generate", "Stream"])
async def test_concurrent_items_share_every_step(
    server: SidecarServer, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """Once all three are prefilled, the three generations share the steps until the first
    ends. (Their tokens are not compared with each alone here: on this random model near-ties
    flip with the batch's shape; the decoder's test above compares logits.)"""
    requests = [
        pb.GenerateRequest(model="gpt2", prompt=p, max_new_tokens=16, temperature=0)
        for p in PROMPTS
    ]
    model = server.registry.resolve("gpt2")
    sizes = _recorded(model.decoder, monkeypatch)  # type: ignore[attr-defined]
    async with channel_to(server) as channel:
        stub = InferenceStub(channel)
        if transport == "Stream":
            answers = await _stream_generations(stub, requests)
            replies = [answers[str(n)] for n in range(len(requests))]
        else:

            async def generate(request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
                return [r async for r in stub.Generate(request, timeout=60)]

            replies = list(await asyncio.gather(*(generate(q) for q in requests)))
    shortest = min(len(token_ids(r)) for r in replies)
    window = sizes[sizes.index(3) :][: shortest - 3]
    # A transport that writes slower than the model decodes holds the steps back (at most
    # LOOKAHEAD answers wait for it), which may split a step now and then on this tiny model
    # under load; before, the three split into groups that took turns for good.
    assert window.count(3) >= 0.75 * len(window) > 0, sizes
    assert all(r[-1].metadata.batch_size == 3 for r in replies)
