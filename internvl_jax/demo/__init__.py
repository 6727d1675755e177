"""Checkpoints the project makes itself, so that everything runs offline.

- `random_model`: random weights at tiny widths in the real layout (the README's real-shape checks, the tests);
- `shapes`: the shapes task (seeded pictures of coloured shapes, one-word questions);
- `shapes_model`: a tiny InternVL trained on it by `internvl-jax finetune`, shipped in `shapes-internvl/`.
"""

from internvl_jax.demo.random_model import byte_tokenizer, demo_config, make_demo_checkpoint

__all__ = ["byte_tokenizer", "demo_config", "make_demo_checkpoint"]
