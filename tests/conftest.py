"""Test-wide settings: float32 matmuls at full precision so parity tolerances can be tight."""

import os
import signal
import threading
import warnings
from pathlib import Path

# One XLA compilation cache for the run: both xdist workers and every subprocess a test starts (they inherit the
# environment) read and write it. Most of the suite's time is XLA:CPU compiling the same small programs again in
# other tests and processes. A fresh clone starts with it empty; entries are keyed by the program, the compile
# options and the jax/XLA versions, so a stale entry is never used. A size limit makes jax lock the directory
# (two workers write it at once).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _ctrl_c_as_python_sets_it(request):
    """Every test starts with Python's own Ctrl-C handler. In one CI run a worker process had SIGINT ignored
    (which child processes inherit, and which makes `_thread.interrupt_main` a no-op), so three interrupt tests
    saw their command finish normally; which earlier test left it so is not known yet: the warning names it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        warnings.warn(f"{request.node.nodeid} left SIGINT handled by {signal.getsignal(signal.SIGINT)!r}",
                      stacklevel=1)
