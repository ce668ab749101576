"""JSON request bodies (as OpenAI, Cohere and TEI document them) -> domain requests.

Fields these routes do not know are ignored, as OpenAI's servers ignore them; fields they
know but cannot honour (several choices, log probabilities, tools) are refused with 400,
naming the field, rather than silently answered as if they had been honoured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from sidecar.domain import (
    ChatMessage,
    EmbedRequest,
    FormatKind,
    GenerateRequest,
    RerankRequest,
    ResponseFormat,
)
from sidecar.errors import InvalidInputError

Body = dict[str, Any]

# Chat roles as OpenAI names them -> the roles chat templates know. A developer message is
# OpenAI's newer name for a system message.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ENCODINGS = ("float", "base64")


class InvalidFieldError(InvalidInputError):
    """A field of the body is wrong; `param` names it in the OpenAI error object."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _no_constant(name: str) -> float:
    raise InvalidInputError(f"the body holds {name}, which JSON does not allow: send numbers")


def parse(raw: bytes) -> Body:
    """The body as a JSON object; anything else is the caller's mistake."""
    try:
        # Decoded first: json.loads would guess UTF-16 or UTF-32 from the first bytes.
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the body is not valid UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInputError("the body's JSON is nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise InvalidInputError(f"the body holds a number that cannot be read: {exc}") from None
    try:
        # A \ud800 escape is valid JSON but no text: refused here, not in the tokenizer.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            "the body holds an unpaired UTF-16 surrogate escape (such as \\ud800): send text"
        ) from None
    except RecursionError:
        raise InvalidInputError("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidInputError(
            f"the body must be a JSON object, got {type(body).__name__}: see the OpenAI API "
            "reference for the route's fields"
        )
    return body


def _shown(value: Any) -> str:
    """A value for a message: short, whatever the caller sent."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "a list"
    return json.dumps(value)[:80]


def _typed(body: Body, name: str, kinds: tuple[type, ...], noun: str) -> Any:
    value = body.get(name)
    # bool is an int to Python, never to JSON callers.
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        raise InvalidFieldError(name, f"{name} must be {noun}, got {_shown(value)}")
    return value


def string(body: Body, name: str, default: str = "") -> str:
    """A string field ("" or `default` when absent or null)."""
    value = _typed(body, name, (str,), "a string")
    return default if value is None else str(value)


def integer(body: Body, name: str, least: int | None = None) -> int | None:
    """An integer field, at least `least`; None when absent or null."""
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 from a caller that only has doubles
    value = _typed({name: value}, name, (int,), "an integer")
    if value is not None and least is not None and value < least:
        raise InvalidFieldError(name, f"{name} must be at least {least}, got {value}")
    return value  # type: ignore[no-any-return]


def number(body: Body, name: str) -> float | None:
    """A finite number field; None when absent or null."""
    value = _typed(body, name, (int, float), "a number")
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidFieldError(name, f"{name} must be a finite number")
    return number


def boolean(body: Body, name: str, *, default: bool = False) -> bool:
    """A boolean field."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidFieldError(name, f"{name} must be true or false, got {_shown(value)}")
    return value


def strings(body: Body, name: str, *, single: bool = True) -> list[str] | None:
    """A list of strings (or, with `single`, one string); None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if single and isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidFieldError(name, f"{name} must be a list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            if isinstance(item, int | list) and not isinstance(item, bool):
                raise InvalidFieldError(
                    name,
                    f"{name}[{index}] is a token id or a list of them: this server takes text "
                    "only (it tokenizes with the model's own tokenizer); send strings",
                )
            raise InvalidFieldError(name, f"{name}[{index}] must be a string")
    return value


def _refuse_unless(body: Body, name: str, honoured: Callable[[Any], bool], why: str) -> None:
    if name in body and body[name] is not None and not honoured(body[name]):
        raise InvalidFieldError(name, f"{name} is not supported: {why}")


def _refuse_unsupported(body: Body) -> None:
    """Fields whose effect this server cannot give: refused, not silently dropped."""
    _refuse_unless(body, "n", lambda v: v == 1, "this server returns one choice; send n = 1")
    _refuse_unless(body, "best_of", lambda v: v == 1, "send best_of = 1 or leave it out")
    _refuse_unless(
        body, "logprobs", lambda v: v in (False, 0), "log probabilities are not returned"
    )
    _refuse_unless(body, "top_logprobs", lambda v: v == 0, "log probabilities are not returned")
    _refuse_unless(body, "echo", lambda v: v is False, "the prompt is not echoed")
    _refuse_unless(body, "suffix", lambda v: v == "", "insertion (suffix) is not supported")
    _refuse_unless(body, "logit_bias", lambda v: v == {}, "logit biases are not applied")
    for penalty in ("presence_penalty", "frequency_penalty"):
        _refuse_unless(body, penalty, lambda v: v == 0, "use repetition_penalty (1 = off) instead")
    _refuse_unless(body, "tools", lambda v: v == [], "tool calls are not generated")
    _refuse_unless(body, "functions", lambda v: v == [], "function calls are not generated")
    _refuse_unless(body, "tool_choice", lambda v: v == "none", "tool calls are not generated")
    _refuse_unless(body, "function_call", lambda v: v == "none", "function calls are not generated")
    _refuse_unless(body, "audio", lambda v: False, "replies are text only")
    _refuse_unless(body, "modalities", lambda v: v == ["text"], "replies are text only")
    _refuse_unless(body, "prediction", lambda v: False, "predicted outputs are not supported")


def embed(body: Body) -> tuple[EmbedRequest, str, int | None]:
    """POST /v1/embeddings: the request, its encoding_format and its dimensions."""
    inputs = strings(body, "input")
    if inputs is None:
        raise InvalidFieldError("input", "input is required: a string or a list of strings")
    if not inputs:
        raise InvalidFieldError("input", "input is an empty list: send at least one string")
    encoding = string(body, "encoding_format", "float")
    if encoding not in ENCODINGS:
        raise InvalidFieldError(
            "encoding_format", f"encoding_format must be float or base64, got {encoding!r}"
        )
    dimensions = integer(body, "dimensions", least=1)
    return EmbedRequest(model=string(body, "model"), inputs=inputs), encoding, dimensions


def rerank(body: Body) -> RerankRequest:
    """POST /v1/rerank in the shape Cohere, TEI and Infinity clients send."""
    query = string(body, "query")
    if not query:
        raise InvalidFieldError("query", "query is required: the text to rank documents against")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise InvalidFieldError("documents", "documents must be a non-empty list of strings")
    texts = []
    for index, document in enumerate(documents):
        if isinstance(document, dict) and isinstance(document.get("text"), str):
            document = document["text"]  # Cohere's {"text": ...} form
        if not isinstance(document, str):
            raise InvalidFieldError(
                "documents", f"documents[{index}] must be a string or an object with text"
            )
        texts.append(document)
    return RerankRequest(
        model=string(body, "model"),
        query=query,
        inputs=texts,
        top_n=integer(body, "top_n", least=0) or 0,
        return_text=boolean(body, "return_documents"),
    )


def _content(index: int, content: Any) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    param = f"messages[{index}].content"
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidFieldError(
                    param, f"{param} holds a {kind!r} part: this server takes text parts only"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidFieldError(param, f"{param}: a text part's text must be a string")
            parts.append(text)
        return "".join(parts)
    raise InvalidFieldError(param, f"{param} must be a string or a list of text parts")


def messages(body: Body) -> list[ChatMessage]:
    """The chat messages, roles mapped to the ones chat templates know."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise InvalidFieldError("messages", "messages must be a non-empty list of messages")
    turns = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise InvalidFieldError("messages", f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidFieldError(
                f"messages[{index}].role",
                f"messages[{index}].role is {_shown(role)}: use one of "
                f"{', '.join(ROLES)} (tool messages are not supported)",
            )
        if message.get("tool_calls"):
            raise InvalidFieldError(f"messages[{index}].tool_calls", "tool calls are not supported")
        turns.append(ChatMessage(ROLES[role], _content(index, message.get("content"))))
    return turns


def response_format(body: Body) -> ResponseFormat | None:
    """OpenAI's response_format: text (free), json_object, or json_schema."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidFieldError("response_format", "response_format must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(FormatKind.JSON_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidFieldError(
                "response_format",
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": '
                "{...}}} with the schema as a JSON object",
            )
        return ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(schema))
    raise InvalidFieldError(
        "response_format",
        f"response_format type {_shown(kind)} is not supported: use text, json_object or "
        "json_schema",
    )


def _max_tokens(body: Body) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = integer(body, name, least=1)
        if value is not None:
            return value
    return 0  # the model's default


def generate(body: Body, *, chat: bool) -> GenerateRequest:
    """POST /v1/chat/completions (chat) or /v1/completions (a prompt)."""
    _refuse_unsupported(body)
    if chat:
        turns, prompt = messages(body), ""
    else:
        prompts = strings(body, "prompt")
        if prompts is None or len(prompts) != 1:
            raise InvalidFieldError(
                "prompt", "prompt must be one string (or a list of exactly one string)"
            )
        turns, prompt = [], prompts[0]
        if not prompt:
            raise InvalidFieldError("prompt", "prompt is empty: send the text to continue")
    return GenerateRequest(
        model=string(body, "model"),
        prompt=prompt,
        messages=turns,
        max_new_tokens=_max_tokens(body),
        temperature=number(body, "temperature"),
        top_p=number(body, "top_p"),
        # Not OpenAI's, but vLLM's and TGI's: the same names as the gRPC contract.
        top_k=integer(body, "top_k", least=0),
        repetition_penalty=number(body, "repetition_penalty"),
        stop=strings(body, "stop") or [],
        seed=integer(body, "seed", least=0),
        response_format=response_format(body),
    )


def stream_options(body: Body) -> tuple[bool, bool]:
    """Whether to stream, and whether a last chunk carries the usage."""
    streaming = boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return streaming, False
    if not isinstance(options, dict):
        raise InvalidFieldError("stream_options", "stream_options must be an object")
    if not streaming:
        raise InvalidFieldError("stream_options", "stream_options needs stream: true")
    return streaming, boolean(options, "include_usage")
