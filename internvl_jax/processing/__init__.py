"""Input processing for InternVL3: tokenizer, chat template, image tiling and video sampling.

`InternVLProcessor` (in `processor.py`) is the entry point; see docs/processor.md for how its outputs compare
with transformers' InternVLProcessor.
"""
