"""Test-wide settings: float32 matmuls at full precision so parity tolerances can be tight."""

import atexit
import os
import shutil
import signal
import tempfile
import threading
import warnings

# One XLA compilation cache for the run: both xdist workers and every subprocess a test starts inherit the
# variable (the workers are started after this file is loaded), so a program compiled in one test is loaded, not
# compiled again, in the others; most of the suite's time is XLA:CPU compiling. A fresh directory each run: timings
# stay those of a fresh clone, and the tests that compare a first (compiling) run with a second still see one.
# A size limit makes jax lock the directory while it reads or writes (two workers at once).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="internvl-jax-xla-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
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

