"""Chat messages to a prompt, rendered with the model's own chat template.

Rendered as transformers' apply_chat_template does: a sandboxed Jinja environment with
trimmed blocks, `raise_exception` for templates that reject a conversation, and the
generation prompt appended so the model answers as the assistant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sidecar.domain import ChatMessage
from sidecar.errors import InvalidInputError, ModelLoadError

ROLES = ("system", "user", "assistant")


class _TemplateRejected(Exception):
    """The template's own raise_exception(): the conversation does not fit the model."""


def _raise(message: str) -> NoReturn:
    raise _TemplateRejected(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # transformers' tojson: not HTML-escaped, non-ASCII kept, so prompts match its rendering.
    return json.dumps(value, ensure_ascii=False, indent=indent)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it;
    rendering only needs the text inside."""

    tags = {"generation"}  # noqa: RUF012  # jinja2 declares it a plain set

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from None
        self._special = special_tokens

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for these turns, ending where the assistant's reply begins."""
        for index, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidInputError(
                    f"messages[{index}].role is {message.role!r}; use one of {', '.join(ROLES)}"
                )
        context: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": True,
            **self._special,
        }
        try:
            return self._template.render(**context)
        except _TemplateRejected as exc:
            raise InvalidInputError(
                f"the model's chat template refused the messages: {exc}"
            ) from None
        except jinja2.TemplateError as exc:
            raise InvalidInputError(
                f"the model's chat template failed on the messages: {exc}"
            ) from None
