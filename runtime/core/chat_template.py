"""Chat templates: a checkpoint's `chat_template` (Jinja2) rendered with the semantics of
transformers' `apply_chat_template`, without importing transformers.

Contract (what transformers 5's `render_jinja_template` does, and what templates rely on):
  * The template runs in jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and
    `lstrip_blocks` and the `loopcontrols` extension: chat templates come from checkpoints, so they
    are untrusted code.
  * It sees `messages` (a list of {"role", "content", ...} dicts), `tools` (None unless given),
    `documents` (None), `add_generation_prompt`, the tokenizer's special-token strings
    (`bos_token`, `eos_token`, `unk_token`, `pad_token` where the tokenizer has them) and any extra
    variables the caller passes (e.g. `date_string` for Llama 3.1).
  * `raise_exception(msg)` raises `ChatTemplateError(msg)`; `tojson` is `json.dumps` with
    `ensure_ascii=False` (jinja2's own escapes HTML), taking `indent`, `separators`, `sort_keys`;
    `strftime_now(fmt)` formats the current local time.
  * The rendered text is tokenized without the tokenizer's own BOS/EOS: a template that wants a BOS
    writes it (see `Tokenizer.encode_chat`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = ["ChatTemplateError", "render_chat", "check_messages"]


class ChatTemplateError(ValueError):
    """A template that cannot be compiled, or one that refused the conversation (`raise_exception`)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_COMPILED: dict[str, Any] = {}


def _compile(template: str) -> Any:
    compiled = _COMPILED.get(template)
    if compiled is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            compiled = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None
        _COMPILED[template] = compiled
    return compiled


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a list of dicts each with a string `role`; anything else is a ChatTemplateError."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role', got {message!r}")
        out.append(json.loads(json.dumps(dict(message))))  # plain JSON data only, a fresh copy
    return out


def render_chat(template: str, messages: Any, special_tokens: Mapping[str, str], *,
                add_generation_prompt: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                **variables: Any) -> str:
    """The text `template` renders for `messages`; `special_tokens`: {"bos_token": "<s>", ...}.
    Raises ChatTemplateError when the template refuses the conversation or fails."""
    import jinja2

    compiled = _compile(template)
    context: dict[str, Any] = {**special_tokens, **variables}
    try:
        return str(compiled.render(messages=check_messages(messages),
                                   tools=json.loads(json.dumps(list(tools))) if tools is not None else None,
                                   documents=None, add_generation_prompt=add_generation_prompt, **context))
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
