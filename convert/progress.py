"""Conversion progress on stderr: bytes and tensors read from the source, parameters written."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, total_tensors: int, total_params: int, enabled: bool = True,
                 desc: str = "converting"):
        self.totals = (total_tensors, total_params)
        self.tensors = 0
        self.params = 0
        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                         disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self._show()

    def _show(self) -> None:
        self._bar.set_postfix_str(f"tensors {self.tensors}/{self.totals[0]}, params {self.params}/{self.totals[1]}",
                                  refresh=False)

    def read(self, nbytes: int) -> None:
        """One source tensor (or one part of a fused one) of `nbytes` was read."""
        self.tensors += 1
        self._show()
        self._bar.update(nbytes)

    def param_done(self) -> None:
        self.params += 1
        self._show()
        self._bar.refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bar.close()
