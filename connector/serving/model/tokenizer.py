"""A byte-level tokenizer: nothing to download, vocab >= 257."""

from __future__ import annotations

BYTE_VOCAB = 256


class ByteTokenizer:
    """Token ``b`` (0..255) is byte ``b``; ``256`` is BOS; ids above print as ``<id>``."""

    bos_id = BYTE_VOCAB

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
