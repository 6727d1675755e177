"""A small random-weight checkpoint that the project makes itself, so everything runs offline.

It has the real InternVL3 layout (448px tiles, 256 tokens per tile, the -hf chat template and processor
configs, ids read from its own files) but tiny widths and a byte-level tokenizer (256 byte tokens, no
merges) with InternVL's special tokens after them. Its weights are random: it answers gibberish. It
exists to run the whole path (processor -> vision -> decoder -> generation -> text) without a download.
Only one thing is not random: the output layer can produce nothing but lowercase letters and spaces, so the
gibberish prints as visible "words" rather than as U+FFFD (a lone byte token of a multi-byte character is
not valid UTF-8 and decodes to U+FFFD, in transformers too) or as special tokens.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from internvl_jax.config import InternVLConfig, TextConfig, VisionConfig
from internvl_jax.processing import checkpoint_files as files


def _byte_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a ByteLevel BPE vocabulary is written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(words: Sequence[str] = ()) -> tuple[str, list[tuple[int, str, bool]]]:
    """tokenizer.json text and the added tokens (ids after the vocabulary) of a byte-level BPE tokenizer.

    Without `words` it has the 256 byte tokens and no merges. Each of `words` (a piece of text as the
    pre-tokenizer cuts it: "What", " colour", "?") becomes one token through merges added for it, in order, until
    the BPE model itself encodes it as one token: a tokenizer for a closed vocabulary without a trainer (whose
    results could differ between versions), the same for the same words."""
    chars = _byte_unicode()
    vocab = {ch: b for b, ch in chars.items()}
    merges: list[tuple[str, str]] = []
    for word in words:
        target = "".join(chars[b] for b in word.encode())
        while len(pieces := [t.value for t in models.BPE(vocab=vocab, merges=merges).tokenize(target)]) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    added = files.all_added_tokens(first_id=len(vocab))
    for _, content, special in added:  # appended in order: ids len(vocab), len(vocab) + 1, ...
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    assert tok.token_to_id(added[-1][1]) == added[-1][0]
    return tok.to_str(), added


def demo_config(image_token_id: int, vocab_size: int) -> InternVLConfig:
    return InternVLConfig(
        vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        text=TextConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=256, vocab_size=vocab_size, rope_theta=1e6),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


# Byte tokens the demo model may output (token id = byte value in this tokenizer).
VISIBLE_BYTES = b" abcdefghijklmnopqrstuvwxyz"


def visible_only(params: dict) -> dict:
    """Zero the lm_head columns ([hidden, vocab]) of every token outside `VISIBLE_BYTES` and scale the others
    up: the other logits are 0 and the visible ones have a standard deviation of about 4 (random ones about
    0.2), so greedy decoding picks a visible byte (the largest of 27 random logits is negative with odds
    2**-27), and so does sampling at temperature 1, mostly. The end token is never chosen: answers
    run to max_new_tokens."""
    lm_head = params["text"]["lm_head"]
    keep = np.zeros(lm_head.shape[1], dtype=bool)
    keep[list(VISIBLE_BYTES)] = True
    return dict(params, text=dict(params["text"], lm_head=jnp.where(jnp.asarray(keep)[None, :], lm_head * 20, 0)))


def make_demo_checkpoint(out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write the demo checkpoint to `out` (replaced only with `force`, and only if we wrote it: see
    `checkpoint.check_destination`)."""
    from internvl_jax.checkpoint import check_destination

    check_destination(out, force)  # before the model is built: a refusal should not take seconds
    return write_checkpoint(out, demo_config, seed, force=force, max_new_tokens=32, adjust=visible_only)


def write_checkpoint(out: str | Path, make_config: Callable[[int, int], InternVLConfig], seed: int, force: bool,
                     max_new_tokens: int, adjust: Callable[[dict], dict] | None = None,
                     words: Sequence[str] = (), max_patches: int = 12) -> Path:
    """A random-weight -hf checkpoint with a byte-level tokenizer (`byte_tokenizer(words)`):
    `make_config(image_token_id, vocab_size)` gives its widths, `adjust` (if any) rewrites the initial parameters;
    the processor cuts pictures into tiles of the vision tower's image_size, at most `max_patches` of them."""
    from internvl_jax.export import export_model
    from internvl_jax.modeling import InternVL

    tokenizer_json, added = byte_tokenizer(words)
    ids = {content: i for i, content, _ in added}
    # Room for the <video> token the processor adds after the last added token.
    config = make_config(ids["<IMG_CONTEXT>"], max(ids.values()) + 2)
    model = InternVL.from_config(config, seed=seed)
    if adjust is not None:
        model.params = adjust(model.params)
    with tempfile.TemporaryDirectory() as side:
        files.write_processor_files(Path(side), tokenizer_json, added, image_seq_length=config.image_seq_length,
                                    tile=config.vision.image_size, max_patches=max_patches)
        generation = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                      "do_sample": False, "max_new_tokens": max_new_tokens}
        (Path(side) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return export_model(model, out, force=force, sidecar_from=Path(side))
