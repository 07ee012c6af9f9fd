"""Streaming text out of token ids: incremental detokenization and stop strings.

Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3) split one multi-byte UTF-8
character across several tokens; decoding one token at a time would emit
U+FFFD halves. :class:`IncrementalDetokenizer` decodes a small window of recent
ids and only releases text once it no longer ends in an incomplete character, so
the pieces always join to exactly the full decoded text. :class:`StopMatcher`
holds back the few characters that might start a stop string, so a stream never
shows text that the final answer cuts off.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_MAX_HELD_TOKENS = 6  # a UTF-8 character has at most 4 bytes; allow for merges


class IncrementalDetokenizer:
    """Turn ids, one at a time, into text pieces.

    ``decode`` is a callable ``(ids) -> str`` (e.g. ``tokenizers.Tokenizer.decode`` with
    ``skip_special_tokens``). ``"".join(pieces) + flush()`` equals ``decode(all ids)``
    for the usual decoders (byte-level, metaspace, wordpiece).
    """

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids up to here have been turned into text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Add one id; return the new text it completes (often ``""`` mid-character)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        held = len(self.ids) - self._read
        if len(new_text) > len(prefix_text) and (not new_text.endswith(_REPLACEMENT) or held >= _MAX_HELD_TOKENS):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            piece = full[len(self.text):]
        else:  # a decoder that is not prefix-stable: fall back to the window
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            piece = self._decode(self.ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


class StopMatcher:
    """Cut a stream at the first stop string, holding back only what might start one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add text; return what is safe to show now. Sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self._buf += piece
        cut = min((i for i in (self._buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._buf, self.stopped = self._buf[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), hold, -1):
                if self._buf.endswith(s[:k]):
                    hold = k
                    break
        out = self._buf[:len(self._buf) - hold]
        self._buf = self._buf[len(self._buf) - hold:]
        return out

    def flush(self) -> str:
        """At the end of generation: whatever was held back was not a stop string after all."""
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out
