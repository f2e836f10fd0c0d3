"""A word-level vocabulary for the caption decoder of Chapter 6: words to token ids and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["WordVocab"]


class WordVocab:
    """A word-level vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the words of the given texts."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in self.tokenize(t)})
        self.itos = ["<pad>", "<bos>", "<eos>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Lower-case words, with the full stop as a word of its own."""
        return text.lower().replace(".", " .").split()

    def encode(self, texts: Sequence[str], max_len: int | None = None) -> Tensor:
        """(N, L) token ids ``<bos> words <eos> <pad>...``; L = the longest text + 2 unless given."""
        rows = []
        for t in texts:
            unknown = [w for w in self.tokenize(t) if w not in self.stoi]
            if unknown:
                raise ValueError(
                    f"words {unknown} of {t!r} are not in the vocabulary; build WordVocab from texts that contain them"
                )
            rows.append([self.BOS, *(self.stoi[w] for w in self.tokenize(t)), self.EOS])
        length = max(map(len, rows)) if max_len is None else max_len
        if any(len(r) > length for r in rows):
            raise ValueError(f"a text has more than max_len - 2 = {length - 2} words; raise max_len")
        return torch.tensor([r + [self.PAD] * (length - len(r)) for r in rows], dtype=torch.long)

    def decode(self, ids: Tensor) -> list[str]:
        """(N, L) token ids -> N strings, read up to the first ``<eos>``."""
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.EOS:
                    break
                if i not in (self.PAD, self.BOS):
                    words.append(self.itos[i])
            texts.append(" ".join(words).replace(" .", "."))
        return texts
