"""Generate over gRPC: token-for-token parity with transformers' generate(), streamed text,
stop sequences, seeds, chat prompts, context policy, cancellation and concurrency bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from sidecar.config import ModelSettings, Settings
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.checkpoints import build_gpt2
from tests.conftest import (
    channel_to,
    export_quietly,
    serving,
    settled_steps,
    steps_after_release,
    text,
    token_ids,
)

PROMPTS = [
    "Refund request: order 1234 never arrived.",
    "The app crashes when I open the settings page.",
    "Café, naïve, façade",
]


@pytest.fixture(scope="module")
def long_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wider GPT-2 with a 1024-token context: slow enough per step to cancel mid-way. Its
    greedy reply to "hi" reaches EOS after 165 tokens, within 0.3 s on a quiet machine, so
    EOS is held back: a long generation here ends by its limit, a cancel or a deadline."""
    source = build_gpt2(
        tmp_path_factory.mktemp("ckpt") / "long",
        context=1024,
        width=256,
        layers=4,
        min_new_tokens=1000,
    )
    # Its logits run large (wide random init), so float error scales with them.
    out = tmp_path_factory.mktemp("models") / "long"
    return export_quietly(source, out, name="long", atol=1e-3)


@pytest.fixture(scope="module")
async def generator(
    gpt2_dir: Path, bart_dir: Path, long_gpt2_dir: Path, classifier_dir: Path
) -> AsyncIterator[SidecarServer]:
    settings = Settings(
        address="127.0.0.1:0",
        http_address="",
        metrics_address="127.0.0.1:0",
        models=(
            ModelSettings(path=gpt2_dir, name="gpt2"),
            ModelSettings(path=bart_dir, name="bart"),
            ModelSettings(path=gpt2_dir, name="gpt2-torch", backend="torch"),
            ModelSettings(path=bart_dir, name="bart-torch", backend="torch"),
            ModelSettings(path=long_gpt2_dir, name="long"),
            ModelSettings(path=classifier_dir, name="triage"),
        ),
        max_concurrent_generations=3,
        grace_period_s=1.0,
        intra_op_threads=1,
    )
    async with serving(settings) as server:
        yield server


@pytest.fixture(scope="module")
async def stub(generator: SidecarServer) -> AsyncIterator[InferenceStub]:
    async with channel_to(generator) as channel:
        yield InferenceStub(channel)


async def generate(stub: InferenceStub, **fields: Any) -> list[pb.GenerateResponse]:
    deadline = fields.pop("deadline_s", None)
    return [r async for r in stub.Generate(pb.GenerateRequest(**fields), timeout=deadline)]


@pytest.mark.parametrize("model", ["gpt2", "gpt2-torch"])
async def test_greedy_decoder_only_equals_transformers_generate(
    stub: InferenceStub, gpt2_source: Path, model: str
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(gpt2_source).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_source)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )[0, ids.shape[1] :].tolist()
        responses = await generate(stub, model=model, prompt=prompt, max_new_tokens=20)
        assert token_ids(responses) == expected
        last = responses[-1]
        assert last.usage.prompt_tokens == ids.shape[1]
        assert last.usage.completion_tokens == len(expected)
        assert text(responses) == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("model", ["bart", "bart-torch"])
async def test_greedy_seq2seq_equals_transformers_generate(
    stub: InferenceStub, bart_source: Path, model: str
) -> None:
    reference = AutoModelForSeq2SeqLM.from_pretrained(bart_source).eval()
    tokenizer = AutoTokenizer.from_pretrained(bart_source)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            # The checkpoint's generation config forces EOS as the last token, as served.
            out = reference.generate(ids, max_new_tokens=12, do_sample=False, num_beams=1)
        expected = out[0, 1:].tolist()  # without the decoder start token
        responses = await generate(stub, model=model, prompt=prompt, max_new_tokens=12)
        assert token_ids(responses) == expected
        assert expected[-1] == tokenizer.eos_token_id
        assert responses[-1].finish_reason == pb.FINISH_REASON_EOS


async def test_one_message_per_token_in_order_and_metadata_on_the_last(
    stub: InferenceStub,
) -> None:
    responses = await generate(stub, model="gpt2", prompt=PROMPTS[0], max_new_tokens=16)
    assert len(responses) == 16
    assert all(len(r.token_ids) == 1 for r in responses)
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert all(not r.HasField("metadata") for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.completion_tokens, last.usage.truncated_prompt_tokens) == (16, 0)
    assert (last.metadata.model, last.metadata.backend) == ("gpt2", "onnx")
    assert last.metadata.inference_us > 0
    assert last.metadata.batch_size >= 1
    torch_last = (await generate(stub, model="gpt2-torch", prompt="x", max_new_tokens=2))[-1]
    assert torch_last.metadata.backend == "torch"


async def test_a_stop_sequence_ends_the_text_before_it(stub: InferenceStub) -> None:
    full = text(await generate(stub, model="gpt2", prompt=PROMPTS[1], max_new_tokens=24))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    responses = await generate(
        stub, model="gpt2", prompt=PROMPTS[1], max_new_tokens=24, stop=[stop, "never-there"]
    )
    assert text(responses) == full[: full.index(stop)]
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_a_seed_makes_sampling_reproducible(stub: InferenceStub) -> None:
    async def sample(seed: int) -> list[int]:
        responses = await generate(
            stub, model="gpt2", prompt=PROMPTS[2], max_new_tokens=20, temperature=1.0, seed=seed
        )
        return token_ids(responses)

    first, again, other = await sample(42), await sample(42), await sample(43)
    assert first == again
    assert first != other


async def test_chat_messages_use_the_models_template(
    stub: InferenceStub, gpt2_source: Path
) -> None:
    messages = [{"role": "system", "content": "Triage."}, {"role": "user", "content": "Refund?"}]
    tokenizer = AutoTokenizer.from_pretrained(gpt2_source)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    responses = await generate(
        stub,
        model="gpt2",
        messages=[pb.ChatMessage(**m) for m in messages],
        max_new_tokens=4,
    )
    assert responses[-1].usage.prompt_tokens == len(ids)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, model="bart", messages=[pb.ChatMessage(**messages[1])])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no chat template" in caught.value.details()


async def test_over_long_prompts_are_cut_or_refused_by_flag(stub: InferenceStub) -> None:
    long_prompt = " ".join(["refund"] * 400)  # over the tiny models' 128-token context
    cut = await generate(stub, model="gpt2", prompt=long_prompt, max_new_tokens=10)
    usage = cut[-1].usage
    assert usage.truncated_prompt_tokens > 0
    assert usage.prompt_tokens + 10 <= 128
    summary = await generate(stub, model="bart", prompt=long_prompt, max_new_tokens=4)
    assert summary[-1].usage.prompt_tokens == 128
    for model in ("gpt2", "bart"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, model=model, prompt=long_prompt, truncate=False)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "set truncate to cut it" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, model="gpt2", prompt="hi", max_new_tokens=500, truncate=False)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens 500 leaves no room" in caught.value.details()
    # With truncation allowed the reply simply ends when the context is full.
    full = await generate(stub, model="gpt2", prompt="hi", max_new_tokens=500)
    assert full[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert full[-1].usage.prompt_tokens + full[-1].usage.completion_tokens <= 128


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"prompt": ""}, "no prompt"),
        ({"prompt": "x", "messages": [pb.ChatMessage(role="user", content="y")]}, "not both"),
        ({"prompt": "x", "max_new_tokens": -3}, "max_new_tokens"),
        ({"prompt": "x", "temperature": -1.0}, "temperature"),
        ({"prompt": "x", "top_p": 2.0}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "repetition_penalty": 0.0}, "repetition_penalty"),
        ({"messages": [pb.ChatMessage(role="robot", content="y")]}, "role"),
    ],
)
async def test_bad_parameters_are_invalid_argument(
    stub: InferenceStub, fields: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, model="gpt2", **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


async def test_a_client_cancel_stops_decoding_within_a_step(
    stub: InferenceStub, generator: SidecarServer
) -> None:
    start = await settled_steps(generator, "long")
    call = stub.Generate(pb.GenerateRequest(model="long", prompt="hi", max_new_tokens=1000))
    received = 0
    async for _ in call:
        received += 1
        if received == 5:
            break
    call.cancel()
    # The cancel reaches the server a moment later (under load, a few steps later): from the
    # moment the server has let the generation go, at most the step already running ends.
    at_release, done = await steps_after_release(generator, "long")
    assert done - at_release <= 1
    assert done - start < 1000


async def test_a_deadline_stops_decoding(stub: InferenceStub, generator: SidecarServer) -> None:
    start = await settled_steps(generator, "long")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, model="long", prompt="hi", max_new_tokens=1000, deadline_s=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    done = await settled_steps(generator, "long")
    assert done - start < 1000
    assert generator.dataplane.generations.running == 0


async def test_a_stream_cancel_ends_the_item_with_cancelled_and_the_stream_goes_on(
    stub: InferenceStub, generator: SidecarServer
) -> None:
    cancel_now = asyncio.Event()

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(
            id="g", generate=pb.GenerateRequest(model="long", prompt="hi", max_new_tokens=1000)
        )
        await cancel_now.wait()
        yield pb.StreamRequest(id="g", cancel=pb.CancelRequest())
        yield pb.StreamRequest(
            id="after", classify=pb.ClassifyRequest(model="triage", inputs=["refund"])
        )

    answers: dict[str, list[pb.StreamResponse]] = {}
    async for response in stub.Stream(requests()):
        answers.setdefault(response.id, []).append(response)
        if response.id == "g" and len(answers["g"]) == 3:
            cancel_now.set()
    generated = answers["g"]
    last = generated[-1].generate
    assert last.finish_reason == pb.FINISH_REASON_CANCELLED
    assert 3 <= last.usage.completion_tokens < 1000
    assert last.usage.completion_tokens == sum(len(a.generate.token_ids) for a in generated)
    assert answers["after"][0].classify.results[0].labels


async def test_concurrent_generations_are_bounded_and_encoder_calls_go_on(
    stub: InferenceStub,
) -> None:
    calls = [
        stub.Generate(pb.GenerateRequest(model="long", prompt="hi", max_new_tokens=300))
        for _ in range(3)
    ]
    firsts = [await anext(aiter(call)) for call in calls]
    assert all(len(f.token_ids) == 1 for f in firsts)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, model="gpt2", prompt="x", max_new_tokens=2)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_generations" in caught.value.details()
    # Encoder traffic is served between decode steps.
    answer = await stub.Classify(pb.ClassifyRequest(model="triage", inputs=["refund"]), timeout=5)
    assert answer.results[0].labels
    ends = []
    for call in calls:
        async for response in call:
            last = response
        ends.append(last)
    assert all(e.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS) for e in ends)
    # The three shared decode steps.
    assert max(e.metadata.batch_size for e in ends) > 1


@pytest.mark.parametrize("model", ["gpt2", "bart"])
async def test_generations_sharing_decode_steps_get_what_each_gets_alone(
    stub: InferenceStub, model: str
) -> None:
    alone = [
        token_ids(await generate(stub, model=model, prompt=p, max_new_tokens=16)) for p in PROMPTS
    ]
    together = await asyncio.gather(
        *(generate(stub, model=model, prompt=p, max_new_tokens=16) for p in PROMPTS)
    )
    assert [token_ids(r) for r in together] == alone
    if model == "gpt2":  # prompts of different lengths shared left-padded steps
        assert max(r[-1].metadata.batch_size for r in together) > 1


async def test_a_tiny_temperature_samples_what_greedy_picks(stub: InferenceStub) -> None:
    greedy = token_ids(await generate(stub, model="gpt2", prompt=PROMPTS[0], max_new_tokens=8))
    cold = await generate(
        stub, model="gpt2", prompt=PROMPTS[0], max_new_tokens=8, temperature=1e-39, seed=3
    )
    assert token_ids(cold) == greedy


def test_left_truncation_keeps_one_leading_bos(generator: SidecarServer) -> None:
    from sidecar.domain import GenerateRequest

    model = generator.registry.resolve("gpt2")
    bos = model.defaults.bos_token_id  # type: ignore[attr-defined]
    assert bos is not None
    # Over the room max_new_tokens leaves (128 - 100), under half the context: kept whole.
    short = "<|endoftext|>"
    while len(model.tokenizer.encode(short).ids) < 40:  # type: ignore[attr-defined]
        short += " refund"
    prompt = model.prompt(GenerateRequest(model="gpt2", prompt=short), 100)  # type: ignore[attr-defined]
    assert (prompt.ids[:2].count(bos), prompt.truncated_tokens) == (1, 0)
    long_text = "<|endoftext|>" + " refund" * 300
    whole = len(model.tokenizer.encode(long_text).ids)  # type: ignore[attr-defined]
    cut = model.prompt(GenerateRequest(model="gpt2", prompt=long_text), 10)  # type: ignore[attr-defined]
    assert cut.ids[0] == bos
    assert cut.ids[1] != bos
    assert len(cut.ids) == 128 - 10
    assert cut.truncated_tokens == whole - len(cut.ids)


async def test_closing_a_scheduler_fails_the_running_step_instead_of_hanging(
    gpt2_dir: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sidecar.domain import GenerateRequest
    from sidecar.errors import ModelNotReadyError
    from sidecar.generation.sampling import resolve
    from sidecar.generation.scheduler import DecodeScheduler
    from sidecar.models.manifest import read_manifest
    from sidecar.serving.loader import load_model

    model = load_model("gpt2", gpt2_dir, read_manifest(gpt2_dir), "cpu", 1)
    request = GenerateRequest(model="gpt2", prompt=" refund" * 60)
    with ThreadPoolExecutor(1) as pool:
        scheduler = DecodeScheduler("gpt2", model.decoder, pool, asyncio.Semaphore(1), 8)  # type: ignore[attr-defined]
        sequence = model.sequence(  # type: ignore[attr-defined]
            model.prompt(request, 8),
            resolve(request, model.defaults),  # type: ignore[attr-defined]
        )
        future = scheduler.submit(sequence)
        for _ in range(1000):  # until the prefill is on the model thread
            if scheduler._running:
                break
            await asyncio.sleep(0)
        assert scheduler._running
        await scheduler.close()
        with pytest.raises(ModelNotReadyError, match="stopped"):
            await asyncio.wait_for(future, 5)
        with pytest.raises(ModelNotReadyError, match="shutting down"):
            scheduler.submit(sequence)


class Panic(BaseException):
    """What a Rust panic in the tokenizers library arrives as (pyo3's PanicException)."""


async def test_a_panic_in_a_step_fails_its_generation_and_the_scheduler_goes_on(
    gpt2_dir: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sidecar.domain import GenerateRequest
    from sidecar.generation.sampling import resolve
    from sidecar.generation.scheduler import DecodeScheduler
    from sidecar.models.manifest import read_manifest
    from sidecar.serving.loader import load_model

    model = load_model("gpt2", gpt2_dir, read_manifest(gpt2_dir), "cpu", 1)
    real = model.decoder  # type: ignore[attr-defined]
    panics = [True]

    class PanicOnce:
        name, device = real.name, real.device

        def prefill(self, ids: Any) -> Any:
            if panics and panics.pop():
                raise Panic("no entry found for key")
            return real.prefill(ids)

        def step(self, caches: Any, tokens: Any) -> Any:
            return real.step(caches, tokens)

    request = GenerateRequest(model="gpt2", prompt="refund")
    with ThreadPoolExecutor(1) as pool:
        scheduler = DecodeScheduler("gpt2", PanicOnce(), pool, asyncio.Semaphore(1), 8)  # type: ignore[arg-type]

        def sequence() -> Any:
            params = resolve(request, model.defaults)  # type: ignore[attr-defined]
            return model.sequence(model.prompt(request, 8), params)  # type: ignore[attr-defined]

        with pytest.raises(Panic):
            await asyncio.wait_for(scheduler.submit(sequence()), 5)
        chunk = await asyncio.wait_for(scheduler.submit(sequence()), 5)
        assert chunk.token_ids
        await scheduler.close()
