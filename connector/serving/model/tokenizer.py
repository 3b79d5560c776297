"""Tokenizers: byte level for the embedded model, ``tokenizer.json`` for checkpoints.

Both offer ``encode(text) -> ids``, ``decode(ids) -> text`` and ``stream()``: a
``Detokenizer`` that turns streamed ids into text pieces without ever cutting a
UTF-8 character (or a multi-token glyph) in half.
"""

from __future__ import annotations

from pathlib import Path

from kvbridge.connector.serving.model.config import ModelConfigError

BYTE_VOCAB = 256
_PARTIAL = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Detokenizer:
    """Incremental detokenization: ``push(id)`` returns the new complete text (maybe "").

    Text is decoded over a window that starts one emitted token back (so tokenizers
    that drop a leading space keep it) and is held back while it ends in U+FFFD, the
    mark of a character whose bytes have not all arrived. ``flush()`` returns what is
    still held (with replacement characters if the stream ended mid-character).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith(_PARTIAL):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :] if len(text) > len(before) else ""


class ByteTokenizer:
    """Token ``b`` (0..255) is byte ``b``; ``256`` is BOS; ids above print as ``<id>``."""

    bos_id = BYTE_VOCAB
    max_bytes_per_token = 1

    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= BYTE_VOCAB:
            raise ValueError(
                f"the byte tokenizer needs vocab_size > {BYTE_VOCAB}, got {vocab_size}"
            )
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """BOS followed by the UTF-8 bytes of ``text``."""
        return [self.bos_id, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: runs of bytes decoded as UTF-8, other ids as ``<id>``."""
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
            out.append(f"<{i}>")
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def stream(self) -> Detokenizer:
        return Detokenizer(self)


class HFTokenizer:
    """A checkpoint's ``tokenizer.json`` through the ``tokenizers`` library (no download)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # a generous bound of the input bytes one token stands for (a vocab spelling is
        # usually at least as long; x4 covers normalizers that shorten the text)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.max_bytes_per_token = 4 * max((len(t.encode()) for t in vocab), default=1)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ModelConfigError(
                "reading tokenizer.json needs the tokenizers package (pip install kvbridge[model])"
            ) from None
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # the library raises plain Exceptions for bad files
            raise ModelConfigError(f"cannot read {path}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with the tokenizer's special tokens (BOS), as transformers does."""
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> Detokenizer:
        return Detokenizer(self)
