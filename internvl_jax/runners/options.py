"""How a batch or eval run generates: the options `run_share` takes, checked where they are made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunOptions:
    slots: int = 16  # decode slots of the continuous-batching engine; 0: static batches of batch_size
    cache_len: int = 4096  # KV cache slots of each decode slot: the longest prompt + answer
    batch_size: int = 8
    window: int = 0  # records encoded and sorted together; 0 means 4 batches
    generation: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of model.generate
    template: Mapping[str, Any] = field(default_factory=dict)  # of apply_chat_template: num_frames, max_patches
    save_token_ids: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # The one check of these sizes: the command line builds its options before anything loads.
        for name, value, least, meaning in (("batch_size", self.batch_size, 1, "at least 1"),
                                            ("slots", self.slots, 0, "0 (static batches) or more"),
                                            ("cache_len", self.cache_len, 16, "at least 16"),
                                            ("window", self.window, 0, "0 (4 x batch size) or more")):
            if value < least:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {meaning}, got {value}")

    @property
    def window_size(self) -> int:
        return max(self.window or 4 * self.batch_size, self.batch_size)
