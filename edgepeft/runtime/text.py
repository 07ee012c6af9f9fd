"""Text in and out on the device: the bundle's ``tokenizer.json`` and its chat template.

Uses the ``tokenizers`` library only (no transformers). Chat templates are
Jinja; they are rendered in jinja2's sandbox (imported lazily) the way
transformers' ``apply_chat_template`` renders them, so a prompt on the device is
the prompt the adapter was trained on: the same environment (trim_blocks,
lstrip_blocks, loop controls, a no-op ``{% generation %}`` block), the same
helpers (``raise_exception``, ``strftime_now``, a ``tojson`` that does not
escape HTML) and the tokenizer's special tokens as variables (``bos_token`` is
printed by Gemma's and Llama 3's templates whether or not the tokenizer adds it).
Without jinja2 a plain ``role: content`` layout is used.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import BundleError, EngineError


class TextCodec:
    """Encode prompts, decode ids, render chat messages. Raises :class:`BundleError` if the files are unusable."""

    def __init__(self, tokenizer_json: bytes, info: dict):
        """``tokenizer_json``: the verified bytes of the bundle's tokenizer file."""
        from tokenizers import Tokenizer

        name = info.get("file", "tokenizer.json")
        try:
            self.tok = Tokenizer.from_str(bytes(tokenizer_json).decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception
            raise BundleError(f"cannot read the bundle's tokenizer {name}: {exc}",
                              hint="the bundle is incomplete; copy it again") from exc
        self.tok.no_padding()
        self.tok.no_truncation()
        self.chat_template = info.get("chat_template")
        self.eos_ids = [int(i) for i in info.get("eos_token_ids", []) or []]
        self.bos_token = info.get("bos_token")
        self.eos_token = self.tok.id_to_token(self.eos_ids[0]) if self.eos_ids else None
        # the tokenizer's special tokens, as transformers passes them to the template (older bundles: bos/eos only)
        tokens = info.get("template_tokens") or {}
        self.template_vars = {k: str(v) for k, v in tokens.items() if isinstance(v, str)}
        self.template_vars.setdefault("bos_token", self.bos_token or "")
        self.template_vars.setdefault("eos_token", self.eos_token or "")
        self._template = None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat (``add_generation_prompt=False``: the conversation as it stands,
        for scoring a reference answer); raises :class:`EngineError` for malformed messages."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise EngineError("messages must be a non-empty list", hint='e.g. [{"role": "user", "content": "hi"}]')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EngineError(f"message {i} needs a string 'role' and a string 'content'",
                                  hint='e.g. {"role": "user", "content": "hi"}')
        if not self.chat_template:
            return self._plain(messages, add_generation_prompt)
        try:
            template = self._compiled()
        except ImportError:
            return self._plain(messages, add_generation_prompt)
        try:
            return template.render(**self.template_vars, messages=list(messages),
                                   add_generation_prompt=add_generation_prompt)
        except EngineError:
            raise
        except Exception as exc:  # jinja2 errors
            raise EngineError(f"the bundle's chat template failed on these messages: {exc}",
                              hint="check the roles and order of the messages") from exc

    @staticmethod
    def _plain(messages, add_generation_prompt: bool) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + "assistant:" if add_generation_prompt else text

    def _compiled(self):
        if self._template is None:
            import datetime
            import json

            from jinja2 import nodes
            from jinja2.ext import Extension, loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            class Generation(Extension):
                """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks: a no-op here."""

                tags = {"generation"}

                def parse(self, parser):
                    lineno = next(parser.stream).lineno
                    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

                def _body(self, caller):
                    return caller()

            def raise_exception(message):
                raise EngineError(f"chat template: {message}", hint="check the roles and order of the messages")

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template
