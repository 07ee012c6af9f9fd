"""Turn checked records into token ids, with the loss on the answer only.

Decoder records are rendered with the base's own chat template (when it has
one) as text, then tokenized once with character offsets; tokens that start
inside an assistant turn get labels, every other token gets -100. Rendering
to text (``tokenize=False``) sidesteps transformers 5's ``apply_chat_template``
returning a mapping when asked for tensors. Without a chat template, prompt and
completion are joined by a newline and the completion ends with EOS.

Raises :class:`DataError` when ``max_length`` cuts away every answer.
"""

from __future__ import annotations

from ..errors import DataError

IGNORE = -100


def to_messages(row: dict) -> list[dict] | None:
    """The chat turns of a decoder record, or None for plain text."""
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return msgs + [{"role": "user", "content": row["prompt"]},
                       {"role": "assistant", "content": row["completion"]}]
    return None


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # some versions hand back a list for a single conversation
        text = text[0]
    return text


def prompt_text(tok, row: dict) -> tuple[str, str] | None:
    """(prompt as the model sees it, reference answer) for answer-match evaluation; None for plain text."""
    msgs = to_messages(row)
    if msgs is None:
        return None
    if has_template(tok):
        return _render(tok, msgs[:-1], True), msgs[-1]["content"]
    prompt = "\n".join(m["content"] for m in msgs[:-1]) + "\n"
    return prompt, msgs[-1]["content"]


def _spans(tok, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans of the assistant answers in it."""
    if not has_template(tok):
        prompt = "\n".join(m["content"] for m in msgs[:-1]) + "\n"
        answer = msgs[-1]["content"] + (tok.eos_token or "")
        return prompt + answer, [(len(prompt), len(prompt) + len(answer))]
    full = _render(tok, msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tok, msgs[:i], True)
        upto = _render(tok, msgs[: i + 1], False)
        if full.startswith(upto) and upto.startswith(before):
            spans.append((len(before), len(upto)))
    if not spans:  # a template that is not prefix-stable: learn the last answer only
        before = _render(tok, msgs[:-1], True)
        if not full.startswith(before):
            raise DataError("the chat template renders a conversation differently from its prefix",
                            hint="use prompt/completion data, or a base whose chat template is prefix-stable")
        spans = [(len(before), len(full))]
    return full, spans


def encode_causal(rows: list[dict], tok, max_length: int, source: str = "data") -> tuple[list[dict], int]:
    """Token ids and labels per record; returns (encoded, number dropped because nothing was left to learn)."""
    encoded, dropped = [], 0
    for row in rows:
        msgs = to_messages(row)
        if msgs is None:
            text = row["text"] + (tok.eos_token or "")
            spans = [(0, len(text))]
        else:
            text, spans = _spans(tok, msgs)
        enc = tok(text, add_special_tokens=msgs is None, return_offsets_mapping=True,
                  truncation=True, max_length=max_length)
        ids = list(enc["input_ids"])
        labels = []
        for tid, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = any(a <= start < b for a, b in spans) and end > start
            labels.append(tid if inside else IGNORE)
        if msgs is None and labels:
            labels = list(ids)  # plain text: every token, BOS and EOS included
        if sum(1 for x in labels if x != IGNORE) < 1:
            dropped += 1
            continue
        encoded.append({"input_ids": ids, "labels": labels})
    if rows and not encoded:
        raise DataError(f"{source}: max_length {max_length} cuts off every answer",
                        hint="raise --max-length or shorten the prompts")
    return encoded, dropped


def encode_classification(rows: list[dict], tok, max_length: int) -> list[dict]:
    out = []
    for row in rows:
        enc = tok(row["text"], truncation=True, max_length=max_length)
        item = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        item["labels"] = int(row["label"])
        out.append(item)
    return out


def collate(batch: list[dict], pad_id: int):
    """Right-pad a list of encoded records into tensors."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    out = {"input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}
    if "token_type_ids" in batch[0]:
        out["token_type_ids"] = torch.zeros((len(batch), width), dtype=torch.long)
    seq_labels = isinstance(batch[0]["labels"], list)
    out["labels"] = torch.full((len(batch), width), IGNORE, dtype=torch.long) if seq_labels \
        else torch.tensor([b["labels"] for b in batch], dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
        out["attention_mask"][i, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.tensor(b["token_type_ids"])
        if seq_labels:
            out["labels"][i, :n] = torch.tensor(b["labels"])
    return out
