"""Chat templates travel with the bundle and render on the device exactly as transformers renders them.

The templates below are written for this test in the styles of the families' own templates (Gemma's
``bos_token`` and role alternation check, Phi-3's ``<|role|>`` turns ending in ``eos_token``, Qwen3's
namespace / reverse loop / ``break`` / thinking switch / ``tojson``), plus a ``{% generation %}`` block and
``strftime_now``; each is rendered by the bundle's ``TextCodec`` (jinja2 only, no transformers) and by
``apply_chat_template``, from the tokenizer files ``edgepeft build`` writes.
"""

from __future__ import annotations

import datetime

import pytest

GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
PHI3_STYLE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' %}{%- set ns.last_user = messages|length - 1 - loop.index0 %}"
    "{% break %}{%- endif %}{%- endfor %}"
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\n' + {'tools': [], 'note': '<b>&'} | tojson + "
    "'<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + ('*' if loop.index0 == ns.last_user else '') + '\\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}{{- content }}{% endgeneration %}{%- else %}{{- content }}"
    "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
DATED = ("{%- if strftime_now is defined %}{{ 'Date: ' + strftime_now('%Y-%m-%d') + '\\n' }}{% endif %}"
         "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}")

CHATS = [
    [{"role": "user", "content": "  Hi there  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "<think>\nhmm\n</think>\nBlue."}, {"role": "user", "content": "Another?"}],
]


def _bundle_codec(tmp_path, template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from edgepeft.bundle.build import _tokenizer_files
    from edgepeft.runtime.text import TextCodec

    specials = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz"))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = template
    dest = tmp_path / "bundle"
    dest.mkdir()
    info = _tokenizer_files(tok, dest)
    return tok, TextCodec((dest / info["file"]).read_bytes(), info)


@pytest.mark.parametrize("name,template", [("gemma", GEMMA_STYLE), ("phi3", PHI3_STYLE), ("qwen3", QWEN3_STYLE),
                                           ("dated", DATED)])
def test_device_renders_like_transformers(tmp_path, name, template):
    tok, codec = _bundle_codec(tmp_path, template)
    for chat in CHATS:
        ref = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert codec.render(chat) == ref, (name, chat)
    if name == "gemma":
        assert codec.render(CHATS[0]).startswith("<bos><start_of_turn>user\nHi there<end_of_turn>")
    if name == "qwen3":
        assert '{"tools": [], "note": "<b>&"}' in codec.render(CHATS[0])  # transformers' tojson: no HTML escapes
    if name == "dated":
        assert datetime.date.today().isoformat() in codec.render(CHATS[0])


def test_template_errors_are_engine_errors(tmp_path):
    from edgepeft.errors import EngineError

    _, codec = _bundle_codec(tmp_path, GEMMA_STYLE)
    with pytest.raises(EngineError, match="roles must alternate"):
        codec.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_raw_prompts_get_the_tokenizers_bos_chats_do_not(tmp_path):
    """As training encodes: ``tok(text)`` for a raw prompt, the rendered template as is for a chat."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from edgepeft.bundle.build import _tokenizer_files
    from edgepeft.runtime.text import TextCodec

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "hello", "world", "user"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = GEMMA_STYLE
    (tmp_path / "b").mkdir()
    info = _tokenizer_files(tok, tmp_path / "b")
    codec = TextCodec((tmp_path / "b" / info["file"]).read_bytes(), info)
    assert codec.encode("hello world", add_special_tokens=True) == tok("hello world").input_ids == [2, 4, 5]
    chat = [{"role": "user", "content": "hello"}]
    text = codec.render(chat)
    assert codec.encode(text) == tok(text, add_special_tokens=False).input_ids
    assert codec.encode(text).count(2) == 1  # one BOS, from the template
