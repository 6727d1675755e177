"""What a fine-tuning run does (jax-free: the command line checks it before anything loads)."""

from __future__ import annotations

import dataclasses

FREEZABLE = {"vision": "vision", "projector": "projector", "language": "text"}  # option name -> parameter subtree
IGNORE = -100  # a label that is not trained on (transformers' convention)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    steps: int = 300  # optimizer updates
    batch_size: int = 8  # rows of one forward pass
    accumulate: int = 1  # forward passes per update
    learning_rate: float = 1e-3
    warmup: int | None = None  # updates of linear warm-up before the cosine decay; None: a tenth of the steps
    end_learning_rate: float = 0.0
    weight_decay: float = 0.01
    clip: float = 1.0  # global gradient norm
    freeze: tuple[str, ...] = ()  # of FREEZABLE
    save_every: int = 100  # updates between checkpoints (and at the end)
    seed: int = 0
    max_length: int = 2048  # tokens a conversation may have
    strict: bool = False  # stop at the first bad record instead of skipping it

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accumulate", "save_every", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(self, name)}")
        if self.warmup is None:
            object.__setattr__(self, "warmup", self.steps // 10)
        if not 0 <= self.warmup < self.steps:  # the cosine decay needs at least one update of its own
            raise ValueError(f"warmup (--warmup) must be at least 0 and less than steps ({self.steps}), got "
                             f"{self.warmup}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate (--learning-rate) must be > 0, got {self.learning_rate}")
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ValueError(f"--freeze {','.join(unknown)}: parts are {', '.join(FREEZABLE)}")
        if set(self.freeze) == set(FREEZABLE):
            raise ValueError("--freeze: every part frozen leaves nothing to train")
