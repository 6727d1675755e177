"""The text tokenizer: `tokenizer.json` through the `tokenizers` library, plus what `tokenizer_config.json`
adds on top (named special tokens, InternVL's model-specific tokens), as transformers' Qwen2Tokenizer does."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from .configs import read_json

# transformers' SPECIAL_TOKENS_ATTRIBUTES (v5): the named special tokens.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as strings or as serialized AddedToken dicts."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


class Tokenizer:
    """Byte-level BPE tokenizer with the special tokens of a transformers tokenizer directory."""

    def __init__(self, backend: HFTokenizer, config: Mapping[str, Any]) -> None:
        self.backend = backend
        self.config = dict(config)
        self.special_tokens_map: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            token = _token_text(self.config.get(key))
            if token is not None:
                self.special_tokens_map[key] = token
        # Model-specific named tokens (start_image_token, context_image_token, video_token, ...): transformers
        # takes them from the `extra_special_tokens` dict and from any other top-level `*_token` string.
        model_specific: dict[str, str] = {}
        for key, value in self.config.items():
            if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(value, (str, Mapping)):
                model_specific[key] = _token_text(value)
        extra = self.config.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            model_specific.update({k: _token_text(v) for k, v in extra.items()})
        self.special_tokens_map.update({k: v for k, v in model_specific.items() if v is not None})
        extra_list = extra if isinstance(extra, list) else self.config.get("additional_special_tokens") or []
        self.extra_special_tokens = [t for t in (_token_text(v) for v in extra_list) if t is not None]
        # transformers' Qwen2Tokenizer registers every special token as a special added token, which gives a
        # token missing from the vocabulary (InternVL's `<video>`) a fresh id. Mirror that so both agree on
        # every id; `<video>` never reaches the model because the processor expands it first.
        missing = [
            t
            for t in [*self.special_tokens_map.values(), *self.extra_special_tokens]
            if self.backend.token_to_id(t) is None
        ]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        path = pathlib.Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found (a `tokenizers` tokenizer.json is required)")
        config = read_json(path / "tokenizer_config.json")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises plain Exception for a malformed file
            raise ValueError(f"{tokenizer_file}: cannot load it as a tokenizer ({exc})") from exc
        return cls(backend, config)

    # --- ids -----------------------------------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def special_token_id(self, key: str) -> int | None:
        return self.token_to_id(self.special_tokens_map.get(key))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- encode / decode -----------------------------------------------------------------------------------

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def pad(
        self,
        sequences: Sequence[Sequence[int]],
        padding: bool | str = False,
        padding_side: str = "left",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) as int64 arrays; ragged batches need padding, as with transformers'
        tensor outputs."""
        lengths = [len(s) for s in sequences]
        if padding in (False, None, "do_not_pad"):
            target = None
        elif padding in (True, "longest"):
            target = max(lengths, default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        else:
            raise ValueError(f"unknown padding strategy {padding!r}")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target is None:
            if len(set(lengths)) > 1:
                raise ValueError(f"the sequences have different lengths {lengths}; pass padding=True to batch them")
            target = lengths[0] if lengths else 0
        pad_id = self.special_token_id("pad_token")
        if pad_id is None and any(n < target for n in lengths):
            raise ValueError("padding needs a pad_token, and tokenizer_config.json has none")
        ids = np.full((len(sequences), target), pad_id if pad_id is not None else 0, dtype=np.int64)
        mask = np.zeros((len(sequences), target), dtype=np.int64)
        for row, seq in enumerate(sequences):
            n = len(seq)
            if n > target:
                raise ValueError(f"sequence {row} has {n} tokens, more than max_length={target}")
            cols = slice(target - n, target) if padding_side == "left" else slice(0, n)
            ids[row, cols] = seq
            mask[row, cols] = 1
        return ids, mask

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """One sequence -> str; a batch (2-D) -> list of str, like transformers v5's `decode`."""
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple, np.ndarray)):
            return self.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        array = np.asarray(ids)
        if array.ndim == 0:
            array = array[None]
        if array.ndim == 2:
            return self.batch_decode(array, skip_special_tokens=skip_special_tokens)
        return self.backend.decode([int(i) for i in array], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = False) -> list[str]:
        return [
            self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)
            for ids in batch
        ]
