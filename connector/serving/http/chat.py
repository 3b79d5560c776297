"""The checkpoint's chat template, rendered with jinja2 the way transformers does.

The template comes from ``chat_template.jinja`` or ``tokenizer_config.json``'s
``chat_template`` (a string, or a list of ``{name, template}`` whose ``default``
is used) in ``--model-path``; special tokens (``bos_token``, ``eos_token``, ...)
from the same ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from kvbridge.connector.serving.daemon.config import ConfigError
from kvbridge.connector.serving.http.errors import APIError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TemplateError(ConfigError):
    """The checkpoint's template files cannot be read (start-up error naming the file)."""


def _token_text(value: Any) -> str:
    """A special token as text (``tokenizer_config.json`` may hold an AddedToken dict)."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    """A compiled chat template and the special tokens it may use."""

    def __init__(self, source: str, special: dict[str, str] | None = None) -> None:
        from jinja2 import TemplateError as JinjaError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise JinjaError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None,
                   sort_keys: bool = False) -> str:  # fmt: skip
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                sort_keys=sort_keys,
            )  # fmt: skip

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special = dict(special or {})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``; a template error is a 400 with its message."""
        from jinja2 import TemplateError as JinjaError

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special
            )
        except JinjaError as exc:
            raise APIError(400, f"chat template: {exc}", param="messages") from None

    @classmethod
    def from_checkpoint(cls, path: str | Path | None) -> ChatTemplate | None:
        """The template of checkpoint dir ``path``; None when it has none."""
        if not path:
            return None
        root = Path(path)
        config: dict[str, Any] = {}
        cfg_file = root / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as exc:
                raise TemplateError(f"cannot read {cfg_file}: {exc}") from None
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text()
        if not isinstance(source, str) or not source:
            return None
        special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        try:
            return cls(source, special)
        except Exception as exc:  # a syntax error in the checkpoint's template
            raise TemplateError(f"chat template of {root} does not compile: {exc}") from None
