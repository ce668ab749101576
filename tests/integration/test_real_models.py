"""Real checkpoints as users bring them: SmolLM2-135M-Instruct from its GGUF file with default
export settings, chatting over gRPC token for token as transformers does and triaging tickets
into JSON that validates against the README's schema; a 4-bit ONNX PII tagger imported as a
pre-exported dir, extracting what onnxruntime and tokenizers give."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import numpy as np
import pytest

from sidecar.config import ModelSettings
from sidecar.server import SidecarServer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import models_pb2
from sidecar.v1.inference_pb2_grpc import InferenceStub
from sidecar.v1.models_pb2_grpc import ModelsStub
from tests import real_models
from tests.conftest import channel_to, local_settings, serving

pytestmark = pytest.mark.slow

CHATS = [
    [
        {"role": "system", "content": "You summarize support tickets in one sentence."},
        {
            "role": "user",
            "content": "Ticket #4821: I was charged twice for my March subscription. The second "
            "charge of $29.99 appeared on March 3rd. I emailed support twice and got no reply. "
            "Please refund the duplicate charge.",
        },
    ],
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer with one word: billing, login, bug or other."},
        {
            "role": "user",
            "content": "I can't sign in since yesterday, the app says my password "
            "is wrong but I just reset it.",
        },
    ],
    # The README's summary recipe.
    [
        {
            "role": "user",
            "content": "Summarize this support ticket in one sentence.\n\nHello, I ordered a "
            "blue jacket (order 88231) two weeks ago and it still has not arrived. The tracking "
            "page has said 'in transit' for ten days. Can you check where it is or send a new "
            "one?",
        }
    ],
]
MAX_NEW_TOKENS = 40
TICKETS = [
    "Hi, this is Maria Gonzalez, my email is maria.gonzalez@example.com and I was charged twice.",
    "Please send the replacement to 221 Baker Street, London. Thanks, John Smith",
    "No personal data here: the export button does nothing on large reports.",
]


def _reference_replies() -> list[list[int]]:
    """transformers' greedy generate() on SmolLM2 loaded from the GGUF by transformers itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = real_models.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    replies = []
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
            )
        replies.append({"prompt": prompt.shape[1], "reply": out[0, prompt.shape[1] :].tolist()})
    return replies


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Any]]:
    """The reference replies, cached by GGUF, versions and prompts (a minute to compute)."""
    key = real_models.reference_key(
        real_models.smollm2_gguf(), {"chats": CHATS, "max_new_tokens": MAX_NEW_TOKENS}
    )

    def build(target: Path) -> None:
        target.mkdir(parents=True)
        (target / "replies.json").write_text(json.dumps(_reference_replies()))

    found = real_models.cached("smollm2-replies", key, build)
    replies: list[dict[str, Any]] = json.loads((found / "replies.json").read_text())
    return replies


@pytest.fixture(scope="module")
async def real(
    smollm2_dir: Path, pii_dir: Path, minilm_dir: Path
) -> AsyncIterator[tuple[SidecarServer, grpc.aio.Channel]]:
    # Named as `make export-real` names them, for the README's recipes.
    settings = local_settings(
        ModelSettings(path=smollm2_dir, name="smollm2"),
        ModelSettings(path=pii_dir, name="pii"),
        ModelSettings(path=minilm_dir, name="all-minilm-l6-v2"),
        intra_op_threads=2,
    )
    async with serving(settings) as server, channel_to(server) as channel:
        yield server, channel


@pytest.fixture(scope="module")
def real_channel(real: tuple[SidecarServer, grpc.aio.Channel]) -> grpc.aio.Channel:
    return real[1]


def test_smollm2_gguf_exports_with_default_settings(smollm2_dir: Path) -> None:
    manifest = json.loads((smollm2_dir / "manifest.json").read_text())
    source = manifest["source"]
    assert source["gguf_file"] == real_models.SMOLLM2_GGUF
    # An independent digest of the file, not the exporter's own helper.
    digest = hashlib.sha256(real_models.smollm2_gguf().read_bytes()).hexdigest()
    assert source["gguf_sha256"] == digest
    assert (manifest["task"], manifest["max_length"]) == ("text-generation", 8192)
    assert "tokenizer.model" not in manifest["files"]  # never a copy of the GGUF
    validation = manifest["validation"]
    assert validation["compared"] == "onnx-vs-pytorch"
    assert (validation["atol"], validation["rtol"], validation["validated_length"]) == (
        1e-4,
        1e-3,
        1024,
    )
    stages = [case["stage"] for case in validation["cases"]]
    assert stages.count("prefill") == 3
    assert "batched cached step" in stages
    # The last positions of the 8k context are checked without an 8k prefill.
    end = next(c for c in validation["cases"] if c["stage"] == "end-of-context cached step")
    assert end["first_position"] + end["seq_len"] == 8192
    assert max(case["seq_len"] for case in validation["cases"]) <= 1025
    assert 0 < validation["tolerance_used"] <= 1
    tokens = validation["next_token"]
    assert tokens["positions"] > 1000
    assert tokens["top1_agreement"] == 1.0
    assert tokens["topk_overlap_min"] >= 0.8
    assert validation["seconds"] > 0
    generation = manifest["generation"]
    assert (generation["eos_token_ids"], generation["bos_token_id"]) == ([2], 1)
    assert manifest["chat_template"] == "chat_template.jinja"


async def test_smollm2_chat_equals_transformers_token_for_token(
    real_channel: grpc.aio.Channel, reference: list[dict[str, Any]]
) -> None:
    stub = InferenceStub(real_channel)

    async def chat(messages: list[dict[str, str]]) -> tuple[list[int], Any]:
        request = pb.GenerateRequest(
            model="smollm2",
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            max_new_tokens=MAX_NEW_TOKENS,
            temperature=0,
        )
        ids: list[int] = []
        last = None
        async for step in stub.Generate(request, timeout=120):
            ids += step.token_ids
            last = step
        return ids, last

    # Concurrently, so the three decode in shared (batched) steps.
    answers = await asyncio.gather(*[chat(c) for c in CHATS])
    for (ids, last), expected in zip(answers, reference, strict=True):
        assert last.usage.prompt_tokens == expected["prompt"]  # the template, rendered the same
        assert ids == expected["reply"]
        eos = ids[-1] == 2  # <|im_end|>
        assert last.finish_reason == (pb.FINISH_REASON_EOS if eos else pb.FINISH_REASON_LENGTH)
    # At least one reply ends the turn itself within the budget.
    assert any(last.finish_reason == pb.FINISH_REASON_EOS for _, last in answers)


ROOT = Path(__file__).resolve().parents[2]
TRIAGE_SCHEMA = (ROOT / "docs" / "examples" / "triage.schema.json").read_text()
TRIAGE_PROMPT = (
    "You triage customer support tickets. Reply with a JSON object: the ticket's category, its "
    "priority, a one-sentence summary, the order number if the ticket gives one, and whether a "
    "person must handle it."
)
SUPPORT_TICKETS = [
    "I was charged twice for my March invoice (order 55120). Please refund the second payment.",
    "I can't log in since yesterday, the password reset email never arrives.",
    "The app crashes every time I open the settings page on Android 14.",
    "Could you add a dark mode? My eyes hurt at night.",
    "Where is my package? Order 88231 has said 'in transit' for ten days.",
    "URGENT: our whole team is locked out after the SSO change this morning!!!",
    "hi",
    "Je n'arrive pas à me connecter depuis la mise à jour.",
    "Your invoice shows VAT twice, see attached. Company account 7781.",
    "The export to CSV button does nothing on reports with more than 10,000 rows.",
    "Please delete my account and all my data under GDPR.",
    "Two-factor codes arrive after they expire, so I can never sign in.",
    'I typed {"a": 1} into the search box and got a 500 error page.',
    "Thanks for the quick fix yesterday, everything works now.",
    "Can I pay by bank transfer instead of card? Order 4410.",
    "The mobile app drains 30% battery per hour in the background.",
    "My subscription renewed even though I cancelled it on the 2nd. Refund please.",
    "Feature idea: let us schedule reports to be emailed every Monday.",
    "Login page shows 'invalid token' in Safari but works in Chrome.",
    "Ordered the wrong size (order 90210123), how do I exchange it?",
]


async def test_smollm2_triage_replies_are_valid_json_for_every_ticket(
    real_channel: grpc.aio.Channel,
) -> None:
    stub = InferenceStub(real_channel)
    schema = json.loads(TRIAGE_SCHEMA)
    slots = asyncio.Semaphore(8)  # the server's max_concurrent_generations

    async def triage(ticket: str) -> tuple[str, int]:
        request = pb.GenerateRequest(
            model="smollm2",
            messages=[
                pb.ChatMessage(role="system", content=TRIAGE_PROMPT),
                pb.ChatMessage(role="user", content=ticket),
            ],
            # Room for the longest reply the schema allows: a 160-character summary can take
            # 160 tokens when the model repeats itself.
            max_new_tokens=320,
            temperature=0,
            response_format=pb.ResponseFormat(json_schema=TRIAGE_SCHEMA),
        )
        async with slots:
            steps = [step async for step in stub.Generate(request, timeout=300)]
        return "".join(s.text for s in steps), steps[-1].finish_reason

    replies = await asyncio.gather(*[triage(t) for t in SUPPORT_TICKETS])
    for ticket, (reply, finish) in zip(SUPPORT_TICKETS, replies, strict=True):
        assert finish == pb.FINISH_REASON_COMPLETE, (ticket, reply)
        jsonschema.validate(json.loads(reply), schema)


async def test_smollm2_tokenizer_follows_the_gguf(real_channel: grpc.aio.Channel) -> None:
    stub = InferenceStub(real_channel)
    # No BOS before a plain text (the GGUF says add_bos_token false), and the chat markers
    # are single special tokens.
    reply = await stub.Tokenize(
        pb.TokenizeRequest(model="smollm2", inputs=["<|im_start|>user\nHi<|im_end|>"]),
        timeout=10,
    )
    tokens = list(reply.results[0].tokens)
    assert tokens[0] == "<|im_start|>"
    assert tokens.count("<|im_start|>") == 1
    assert "<|im_end|>" in tokens
    plain = await stub.Tokenize(
        pb.TokenizeRequest(model="smollm2", inputs=["Hi"], add_special_tokens=True), timeout=10
    )
    assert list(plain.results[0].tokens) == ["Hi"]


def _direct_pii(texts: list[str]) -> list[list[tuple[str, float, int, int]]]:
    """The PII ONNX graph run by onnxruntime on tokenizers' ids: each non-O token's label,
    probability and character span."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    source = real_models.pii_dir()
    labels = json.loads((source / "config.json").read_text())["id2label"]
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    session = ort.InferenceSession(
        str(source / "onnx" / "model_q4.onnx"), providers=["CPUExecutionProvider"]
    )
    found = []
    for text in texts:
        encoding = tokenizer.encode(text)
        feed = {
            "input_ids": np.asarray([encoding.ids], np.int64),
            "attention_mask": np.asarray([encoding.attention_mask], np.int64),
            "token_type_ids": np.asarray([encoding.type_ids], np.int64),
        }
        logits = session.run(None, feed)[0][0]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        entities = []
        for index, (start, end) in enumerate(encoding.offsets):
            best = int(probs[index].argmax())
            if encoding.special_tokens_mask[index] or labels[str(best)] == "O":
                continue
            entities.append((labels[str(best)], float(probs[index, best]), start, end))
        found.append(entities)
    return found


async def test_pii_dir_imports_and_extracts_what_onnxruntime_gives(
    real_channel: grpc.aio.Channel,
) -> None:
    reply = await InferenceStub(real_channel).ExtractEntities(
        pb.ExtractEntitiesRequest(
            model="pii", inputs=TICKETS, aggregation=pb.AGGREGATION_STRATEGY_NONE
        ),
        timeout=30,
    )
    expected = _direct_pii(TICKETS)
    for result, direct in zip(reply.results, expected, strict=True):
        got = [(e.label, e.score, e.span.start, e.span.end) for e in result.entities]
        assert [(g[0], g[2], g[3]) for g in got] == [(d[0], d[2], d[3]) for d in direct]
        np.testing.assert_allclose([g[1] for g in got], [d[1] for d in direct], atol=1e-5)
    labels = {e.label.split("-", 1)[1] for e in reply.results[0].entities}
    assert {"GIVEN_NAME", "SURNAME", "EMAIL"} <= labels
    assert not reply.results[2].entities


async def test_get_model_says_the_pii_graph_was_not_compared_with_pytorch(
    real_channel: grpc.aio.Channel,
) -> None:
    models = ModelsStub(real_channel)
    pii = (await models.GetModel(models_pb2.GetModelRequest(model="pii"), timeout=5)).model
    assert pii.validation_compared == "onnx-self-consistency"
    assert (pii.quantization, pii.max_length, len(pii.labels)) == ("int4", 512, 35)
    assert pii.validation_rtol == 1e-3
    smollm2 = (await models.GetModel(models_pb2.GetModelRequest(model="smollm2"))).model
    assert smollm2.validation_compared == "onnx-vs-pytorch"
    assert smollm2.source.endswith(real_models.SMOLLM2_GGUF)


def readme_recipes() -> list[tuple[str, str, str]]:
    """(title, code, what it printed) of each recipe in the README."""
    text = (real_models.ROOT / "README.md").read_text()
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    found = []
    for part in section.split("\n### ")[1:]:
        code = re.search(r"```python\n(.*?)```", part, re.DOTALL)
        printed = re.search(r"Printed:\n\n```\n(.*?)```", part, re.DOTALL)
        assert code, f"recipe {part.splitlines()[0]!r} has no python block"
        assert printed, f"recipe {part.splitlines()[0]!r} shows no output"
        found.append((part.splitlines()[0], code.group(1), printed.group(1)))
    return found


@pytest.mark.parametrize(("title", "code", "printed"), readme_recipes(), ids=lambda v: v[:24])
async def test_the_readme_recipes_print_what_the_readme_shows(
    real: tuple[SidecarServer, grpc.aio.Channel], title: str, code: str, printed: str
) -> None:
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{real[0].port}")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=real_models.ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    assert out.decode() == printed, f"{title}: the README shows other output"
