"""Checkpoint converter: PyTorch safetensors (-hf or original OpenGVLab layout) -> sharded orbax, and back.

    python -m convert SRC DST [--dtype auto|bfloat16|float32] [--layout auto|hf|original] [--force]
    internvl-jax convert ...   (the same code: `convert.cli.convert_main`)
    internvl-jax export SRC DST  (a converted directory -> -hf safetensors: `convert.cli.export_main`)
"""

from convert.core import convert

__all__ = ["convert"]
