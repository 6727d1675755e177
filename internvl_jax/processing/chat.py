"""Chat messages: validation, media extraction and jinja2 rendering the way transformers renders templates
(`utils/chat_template_utils.render_jinja_template`: sandboxed, trim_blocks + lstrip_blocks, loopcontrols,
a JSON `tojson`, `raise_exception`, `strftime_now`, template data reduced to plain JSON types)."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .loading import InputError, Reworked, check_text

# Keys transformers reads a medium from, in its order.
IMAGE_KEYS = ("image", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path")
CONTENT_TYPES = ("text", "image", "video")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def compile_template(source: str, origin: str = "the chat template") -> jinja2.Template:
    """The compiled template; a syntax error is a ValueError naming `origin` (its file) and the line."""
    if not isinstance(source, str):
        raise ValueError(f"{origin}: the chat template must be a string, got {type(source).__name__}")
    try:
        return _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{origin}: chat template syntax error on line {exc.lineno}: {exc.message}") from exc


def plain_data(value: Any) -> Any:
    """What the template may see: JSON-like types only; other objects (images, arrays) become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


@dataclasses.dataclass(frozen=True)
class Media:
    """One image or video of a conversation, with a label for error messages."""

    kind: str  # "image" or "video"
    source: Any
    name: str


def normalize_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """Validate the message structure; return (conversations, is_batched). Keys whose value is None are
    dropped and OpenAI-style `image_url` blocks become `image` blocks, as in transformers."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError(
            "messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists (a batch); "
            f"got {type(conversation).__name__}"
        )
    is_batched = isinstance(conversation[0], (list, tuple))
    conversations = list(conversation) if is_batched else [conversation]
    out = []
    for c, chat in enumerate(conversations):
        where = f"conversation {c}" if is_batched else "messages"
        if not isinstance(chat, (list, tuple)):
            raise InputError(f"{where}: expected a list of message dicts, got {type(chat).__name__}")
        messages = []
        for m, message in enumerate(chat):
            label = f"{where}, message {m}"
            if not isinstance(message, Mapping):
                raise InputError(f"{label}: a message must be a dict with 'role' and 'content', got {message!r:.80}")
            message = {k: v for k, v in message.items() if v is not None}
            if not isinstance(message.get("role"), str):
                raise InputError(f"{label}: missing or non-string 'role'")
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                message["content"] = [
                    _normalize_block(block, f"{label}, content {k}") for k, block in enumerate(content)
                ]
            elif isinstance(content, str):
                check_text(content, label)
            elif content is not None:
                raise InputError(
                    f"{label}: 'content' must be a string or a list of content dicts, got {type(content).__name__}"
                )
            messages.append(message)
        out.append(messages)
    return out, is_batched


def _normalize_block(block: Any, label: str) -> dict:
    if not isinstance(block, Mapping):
        raise InputError(f"{label}: a content item must be a dict with a 'type', got {block!r:.80}")
    block = {k: v for k, v in block.items() if v is not None}
    kind = block.get("type")
    if kind == "image_url" and "image_url" in block:
        info = block["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, Mapping) else info}
    if kind not in CONTENT_TYPES:
        raise InputError(f"{label}: unknown content type {kind!r}; expected one of {', '.join(CONTENT_TYPES)}")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise InputError(f"{label}: a text item needs a string 'text'")
        check_text(block["text"], label)
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS if kind == "video" else ()
    if keys:
        present = [k for k in keys if k in block]
        if len(present) != 1:
            raise InputError(f"{label}: an {kind} item needs exactly one of {', '.join(keys)}; got {present or 'none'}")
    return block


def collect_media(conversations: list[list[dict]], is_batched: bool) -> list[list[Media]]:
    """Per conversation, its images and videos in template order."""
    batch = []
    for c, chat in enumerate(conversations):
        where = f"conversation {c}" if is_batched else "messages"
        media = []
        for m, message in enumerate(chat):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for k, block in enumerate(content):
                kind = block["type"]
                if kind in ("image", "video"):
                    key = next(key for key in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS) if key in block)
                    source = block[key]
                    if kind == "image" and (block.get("upscale") or block.get("save_as")):
                        source = Reworked(source, int(block.get("upscale") or 1), block.get("save_as"))
                    media.append(Media(kind, source, f"{where}, message {m}, content {k} ({kind})"))
        batch.append(media)
    return batch


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render(
    template: str,
    conversations: list[list[dict]],
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Render each conversation; `continue_final_message` cuts the prompt after the last message's text."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    compiled = compile_template(template)
    extra = plain_data(kwargs)
    rendered = []
    for chat in conversations:
        chat = plain_data(chat)
        final_text = None
        if continue_final_message:
            if not chat:
                raise InputError("continue_final_message is set but the conversation is empty")
            last = chat[-1]
            content = last.get("content")
            if isinstance(content, str):
                final_text = content
                last["content"] = content + CONTINUE_TAG
            else:
                texts = [b for b in content or [] if "text" in b]
                if not texts:
                    raise InputError("continue_final_message is set but the final message has no text")
                final_text = texts[-1]["text"]
                texts[-1]["text"] = final_text + CONTINUE_TAG
        try:
            text = compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.TemplateError as exc:  # raise_exception(...) of the template, or an undefined name
            raise InputError(f"the chat template rejected the messages: {exc}") from exc
        if final_text is not None:
            loc = text.rindex(CONTINUE_TAG.strip())
            text = text[:loc] if text[loc : loc + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:loc].rstrip()
        rendered.append(text)
    return rendered
