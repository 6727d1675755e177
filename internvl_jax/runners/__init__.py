"""Batch inference and benchmark evaluation runs: resumable, sharded over processes, nothing lost.

- `records`: input files (JSONL prompts, VLMEvalKit TSV / JSONL benchmark rows) -> requests.
- `shards`: which process takes which record, append-only part files, the merge in input order.
- `batch`: the generation loop (length/tile-sorted static batches, a prefetching encoder, progress).
- `scoring` / `eval`: the InternVL / VLMEvalKit multiple-choice prompt, option extraction, accuracy.
- `commands`: what `internvl-jax batch` and `internvl-jax eval` run.

See docs/runners.md.
"""
