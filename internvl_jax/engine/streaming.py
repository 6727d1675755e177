"""Turning streamed token ids into text as it is produced (transformers' TextStreamer, for one row)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import numpy as np


class TextStreamer:
    """Decodes row 0's tokens as they arrive and writes only the new text; holds back an incomplete
    UTF-8 sequence (decoded as U+FFFD) until the next token completes it."""

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO | None = None,
                 on_text: Callable[[str], None] | None = None):
        self.decode = decode
        self.out = out if out is not None else sys.stdout
        self.on_text = on_text
        self.tokens: list[int] = []
        self.printed = 0

    def put(self, tokens: np.ndarray) -> None:
        self.tokens.extend(int(t) for t in np.asarray(tokens)[0])
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self._emit(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.decode(self.tokens)
        self._emit(text[self.printed:])
        self.printed = len(text)

    def _emit(self, piece: str) -> None:
        if not piece:
            return
        if self.on_text is not None:
            self.on_text(piece)
        else:
            self.out.write(piece)
            self.out.flush()
