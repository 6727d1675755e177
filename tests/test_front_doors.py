"""processor -> generate end to end (images, video, batches) against transformers' generate on the same
inputs; pipeline(); the CLI; the demo checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_jax import InternVL, InternVLProcessor, pipeline
from tests import fixtures as F
from tests import tiny_models as tm

EOS, PAD = 151645, 151643


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model at the real tile size (448px, 256 tokens a tile) with the real processor files."""
    cfg = tm.hf_config(dict(tm.VISION, image_size=448))
    directory = tmp_path_factory.mktemp("full")
    ref = tm.torch_model(cfg, seed=5)
    tm.save(ref, directory)
    F.write_processor_files(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS, "pad_token_id": PAD}))
    return directory, ref


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(F.synthetic_rgb(150, 400, 1)).save(d / "wide.png")  # 2x1 grid + thumbnail
    Image.fromarray(F.synthetic_rgb(120, 100, 2)).save(d / "tall.png")  # one tile
    F.write_video(d / "clip.mp4", F.synthetic_video(12, 96, 128, 3), fps=6)
    return d


def conversations(media):
    wide, tall, clip = (str(media / n) for n in ("wide.png", "tall.png", "clip.mp4"))
    return {
        "text": [{"role": "user", "content": [{"type": "text", "text": "Say something long."}]}],
        "image": [{"role": "user", "content": [{"type": "image", "url": wide},
                                               {"type": "text", "text": "What is this?"}]}],
        "two_images": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                       {"role": "user", "content": [{"type": "image", "url": tall}, {"type": "image", "url": wide},
                                                    {"type": "text", "text": "Compare."}]}],
        "video": [{"role": "user", "content": [{"type": "video", "url": clip},
                                               {"type": "text", "text": "What happens?"}]}],
    }


def torch_generate(ref, inputs, new):
    args = {"input_ids": torch.tensor(inputs["input_ids"]), "attention_mask": torch.tensor(inputs["attention_mask"])}
    if inputs.get("pixel_values") is not None:
        args["pixel_values"] = torch.tensor(inputs["pixel_values"])
    with torch.no_grad():
        return ref.generate(**args, max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD).numpy()


def test_processor_to_generate_matches_transformers(ckpt, media):
    directory, ref = ckpt
    model, processor = InternVL.from_pretrained(directory), InternVLProcessor.from_pretrained(directory)
    convs = conversations(media)
    batch = [convs[k] for k in ("video", "text", "two_images", "image")]
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           padding=True, num_frames=4, max_patches=3)
    # 4 frames, then per image at most 3 tiles (+ a thumbnail when tiled): a prompt of a few thousand tokens.
    assert inputs["pixel_values"].shape[0] == int(np.sum(inputs["num_patches"])) <= 4 + 3 * 4
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens=32)
    np.testing.assert_array_equal(ours, torch_generate(ref, inputs, 32))


def test_pipeline_single_and_batched(ckpt, media):
    directory, ref = ckpt
    pipe = pipeline("image-text-to-text", model=directory)
    convs = conversations(media)
    out = pipe(text=convs["image"], max_new_tokens=12, return_full_text=False)
    inputs = pipe.processor.apply_chat_template([convs["image"]], add_generation_prompt=True, tokenize=True,
                                                return_dict=True, padding=True)
    ref_ids = torch_generate(ref, inputs, 12)[0, inputs["input_ids"].shape[1]:]
    assert out == [{"input_text": convs["image"],
                    "generated_text": pipe.processor.decode(ref_ids, skip_special_tokens=True)}]
    both = pipe(text=[convs["text"], convs["image"]], max_new_tokens=12)
    assert len(both) == 2 and both[1][0]["generated_text"][-1]["role"] == "assistant"
    assert both[1][0]["generated_text"][-1]["content"] == out[0]["generated_text"]
    # The same list through the slot engine (continuous batching): the same answers.
    assert pipe(text=[convs["text"], convs["image"]], max_new_tokens=12, slots=1) == both
    with pytest.raises(ValueError, match="task 'summarization'"):
        pipeline("summarization", model=directory)


def cli(*args, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "internvl_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_generate_json_stream_and_errors(ckpt, media, capsys):
    """`--json` and `--stream` in this process (one set of compiled programs); the errors through the entry
    point (test_demo_checkpoint_runs_offline runs `generate` in a process of its own)."""
    from internvl_jax.cli import main

    directory, ref = ckpt
    image = str(media / "wide.png")
    capsys.readouterr()
    assert main(["generate", "--model", str(directory), "--image", image, "--max-new-tokens", "10", "--json",
                 "What is this?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "timings"} and len(out["token_ids"]) <= 10
    processor = InternVLProcessor.from_pretrained(directory)
    inputs = processor.apply_chat_template(conversations(media)["image"][:1], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)
    # The CLI's message is the conversation's (image first, then the text).
    expected = torch_generate(ref, inputs, 10)[0, inputs["input_ids"].shape[1]:]
    expected = [int(t) for t in expected if t != PAD]
    assert out["token_ids"][: len(expected)] == expected
    assert main(["generate", "--model", str(directory), "--image", image, "--max-new-tokens", "10", "--stream",
                 "What is this?"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.strip() == out["text"].strip()
    missing = cli("generate", "--model", str(directory), "--image", str(media / "nope.png"), "hi", check=False)
    assert missing.returncode == 2 and "nope.png" in missing.stderr and "Traceback" not in missing.stderr
    offline = cli("generate", "--model", "OpenGVLab/not-a-real-repo-xyz", "hi", check=False)
    assert offline.returncode == 2 and "local checkpoint directory" in offline.stderr


def test_demo_checkpoint_runs_offline(tmp_path):
    assert "wrote" in cli("demo", str(tmp_path / "demo")).stdout
    again = cli("demo", str(tmp_path / "demo"), check=False)
    assert again.returncode != 0 and "exists" in (again.stderr + again.stdout)
    img = tmp_path / "x.png"
    Image.fromarray(F.synthetic_rgb(200, 300, 0)).save(img)
    out = json.loads(cli("generate", "--model", str(tmp_path / "demo"), "--image", str(img), "--max-new-tokens",
                         "6", "--json", "Describe.").stdout)
    assert 1 <= len(out["token_ids"]) <= 6 and out["prompt_tokens"] > 256
