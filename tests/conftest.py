"""Test-wide settings: float32 matmuls at full precision so parity tolerances can be tight."""

import signal
import threading
import warnings

import jax
import pytest

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
