"""`pipeline("image-text-to-text", model=path)`: chat messages in, generated text out, as in transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("image-text-to-text",)


class ImageTextToTextPipeline:
    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    def __call__(self, text: Any = None, images: Any = None, return_full_text: bool = True, slots: int = 0,
                 **generate_kwargs: Any) -> list:
        """`text` is one conversation (a list of messages) or a list of them; `images` may give the images
        of a plain-text prompt. One entry per conversation, each `[{"input_text", "generated_text"}]`.
        `slots` > 0 runs a list of conversations through the slot engine (continuous batching: each starts as
        soon as a slot frees; the same answers as one `generate` call for all of them)."""
        if text is None:
            raise ValueError("pipeline call needs text= (messages or a prompt string)")
        batched = _is_batch(text)
        conversations = text if batched else [text]
        if all(isinstance(c, str) for c in conversations):
            inputs = self.processor(text=list(conversations), images=images, padding=True, return_tensors="np")
        else:
            for i, conv in enumerate(conversations):
                if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m for m in conv):
                    raise ValueError(f"conversation {i} must be a list of {{'role', 'content'}} messages")
            inputs = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, padding=True, return_tensors="np")
        ids = np.asarray(inputs["input_ids"])
        if slots and batched and not isinstance(conversations[0], str):
            one = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                      return_tensors="np") for c in conversations]
            outs = self.model.generate_many([{"input_ids": x["input_ids"], "pixel_values": x.get("pixel_values")}
                                             for x in one], slots=slots, **generate_kwargs)
            texts = [self.processor.decode(o[x["input_ids"].shape[1]:], skip_special_tokens=True)
                     for o, x in zip(outs, one, strict=True)]
        else:
            out = self.model.generate(ids, inputs.get("pixel_values"), inputs.get("attention_mask"),
                                      **generate_kwargs)
            texts = self.processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        results = []
        for conv, answer in zip(conversations, texts, strict=True):
            if not return_full_text:
                generated: Any = answer
            elif isinstance(conv, str):
                generated = conv + answer
            else:
                generated = [*conv, {"role": "assistant", "content": answer}]
            results.append([{"input_text": conv, "generated_text": generated}])
        return results if batched else results[0]


def _is_batch(text: Any) -> bool:
    """A list of conversations (list of lists) or of prompt strings, versus one conversation."""
    if isinstance(text, str):
        return False
    return isinstance(text, (list, tuple)) and len(text) > 0 and isinstance(text[0], (list, tuple, str))


def pipeline(task: str, model: str | Path, dtype: str | None = None, mesh: Any = None) -> ImageTextToTextPipeline:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; tasks: {', '.join(TASKS)}")
    from internvl_jax.hub import resolve
    from internvl_jax.modeling import InternVL
    from internvl_jax.processing.processor import InternVLProcessor

    directory = resolve(model)
    return ImageTextToTextPipeline(InternVL.from_pretrained(directory, dtype=dtype, mesh=mesh),
                                   InternVLProcessor.from_pretrained(directory))
