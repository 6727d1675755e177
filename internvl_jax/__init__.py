"""InternVL3 vision-language models in JAX/Flax.

Public names are imported lazily so that `import internvl_jax` stays cheap (the processor does not need
the model, the CLI does not need both).
"""

import glob
import os
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


def _quiet_libtpu_without_tpus() -> None:
    """With the `tpu` extra installed (compile-only TPU plans) on a machine without TPUs, libtpu's start-up in any
    jax program writes a page of warnings about undetermined TPU hosts to stderr. Where no TPU is attached
    (no /dev/accel*, no /dev/vfio/N), give it the settings that keep it quiet; a TPU VM is left as it is. Set
    before jax starts its backends (lazily, at the first device query), so importing this package first is
    enough."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # any valid name: compile-only, never run
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock file


_quiet_libtpu_without_tpus()

_PUBLIC = {
    "InternVL": "internvl_jax.modeling",
    "InternVLConfig": "internvl_jax.config",
    "InternVLProcessor": "internvl_jax.processing.processor",
    "pipeline": "internvl_jax.pipelines",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'internvl_jax' has no attribute {name!r}")
