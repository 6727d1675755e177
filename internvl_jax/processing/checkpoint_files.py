"""The processor side of an `-hf` checkpoint directory, as `OpenGVLab/InternVL3-1B-hf` lays it out.

Used to make checkpoints that the processor (ours and transformers') loads: the demo checkpoint of the
README's main command and the test fixtures. Token ids are never taken from here at run time: the
processor reads them from the files.
"""

from __future__ import annotations

import json
import pathlib

# Qwen2.5 special tokens 151643..151664; the last eight are "added but not special" in Qwen2.5's files.
QWEN25_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_FIRST_SPECIAL_ID = 151643

# InternVL3's tokens, appended right after Qwen2.5's: <img> 151665 ... </box> 151673.
INTERNVL_ADDED_TOKENS: tuple[str, ...] = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

# The chat template the -hf checkpoints publish (no default system prompt).
INTERNVL_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def all_added_tokens(first_id: int = QWEN25_FIRST_SPECIAL_ID) -> list[tuple[int, str, bool]]:
    """(id, content, special) for every added token of InternVL3-1B-hf, ids in file order (from `first_id`)."""
    out = [(first_id + i, tok, special) for i, (tok, special) in enumerate(QWEN25_SPECIAL_TOKENS)]
    first = first_id + len(QWEN25_SPECIAL_TOKENS)
    out += [(first + i, tok, True) for i, tok in enumerate(INTERNVL_ADDED_TOKENS)]
    return out


def tokenizer_config(added: list[tuple[int, str, bool]] | None = None) -> dict:
    """tokenizer_config.json as the -hf conversion writes it (Qwen2.5-VL's tokenizer + InternVL tokens)."""
    added = added if added is not None else all_added_tokens()
    extra_special = [tok for _, tok, special in added if special and tok != "<|endoftext|>"]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tid): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for tid, tok, special in added
        },
        "additional_special_tokens": extra_special,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "context_image_token": "<IMG_CONTEXT>",
        "end_image_token": "</img>",
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {
            "context_image_token": "<IMG_CONTEXT>",
            "end_image_token": "</img>",
            "start_image_token": "<img>",
            "video_token": "<video>",
        },
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "processor_class": "InternVLProcessor",
        "split_special_tokens": False,
        "start_image_token": "<img>",
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "video_token": "<video>",
    }


def preprocessor_config(tile: int = 448, max_patches: int = 12) -> dict:
    return {
        "crop_size": None,
        "crop_to_patches": True,
        "data_format": "channels_first",
        "default_to_square": True,
        "device": None,
        "disable_grouping": None,
        "do_center_crop": None,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": IMAGENET_MEAN,
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "image_std": IMAGENET_STD,
        "input_data_format": None,
        "max_patches": max_patches,
        "min_patches": 1,
        "processor_class": "InternVLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "return_tensors": None,
        "size": {"height": tile, "width": tile},
    }


def video_preprocessor_config(tile: int = 448) -> dict:
    return {
        "crop_size": None,
        "data_format": "channels_first",
        "default_to_square": True,
        "device": None,
        "do_center_crop": None,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "fps": None,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "initial_shift": True,
        "input_data_format": None,
        "num_frames": None,
        "processor_class": "InternVLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "return_tensors": None,
        "size": {"height": tile, "width": tile},
        "size_divisor": None,
        "video_metadata": None,
        "video_processor_type": "InternVLVideoProcessor",
    }


def processor_config(image_seq_length: int = 256) -> dict:
    return {"image_seq_length": image_seq_length, "processor_class": "InternVLProcessor"}


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_processor_files(dirpath: pathlib.Path, tokenizer_json: str,
                          added: list[tuple[int, str, bool]] | None = None, image_seq_length: int = 256,
                          tile: int = 448, max_patches: int = 12) -> None:
    """Write the processor side of a checkpoint directory into `dirpath` (created if needed): the given
    tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
    video_preprocessor_config.json, processor_config.json. generation_config.json is not written here.
    `tile`: the side pictures are cut or resized to (the vision tower's image_size); `max_patches`: tiles a
    picture may be cut into (1: always resized to one tile)."""
    dirpath = pathlib.Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(dirpath / "tokenizer_config.json", tokenizer_config(added))
    (dirpath / "chat_template.jinja").write_text(INTERNVL_HF_CHAT_TEMPLATE, encoding="utf-8")
    _write_json(dirpath / "preprocessor_config.json", preprocessor_config(tile, max_patches))
    _write_json(dirpath / "video_preprocessor_config.json", video_preprocessor_config(tile))
    _write_json(dirpath / "processor_config.json", processor_config(image_seq_length))
