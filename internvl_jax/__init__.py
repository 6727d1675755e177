"""InternVL3 vision-language models in JAX/Flax.

Public names are imported lazily so that `import internvl_jax` stays cheap (the processor does not need
the model, the CLI does not need both).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

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
