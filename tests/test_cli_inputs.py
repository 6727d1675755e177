"""Generation options, generation_config.json, the CLI's own checks and help texts, the demo model's output."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from internvl_jax.cli import main
from internvl_jax.engine.sampling import SamplingConfig

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"temperature": INF}, r"temperature must be a finite number, got inf"),  # greedy: it used to be ignored
        ({"temperature": INF, "do_sample": True}, r"temperature must be a finite number, got inf"),
        ({"temperature": NAN, "do_sample": True}, r"temperature must be a finite number, got nan"),
        ({"top_p": NAN}, r"top_p must be a finite number"),
        ({"repetition_penalty": INF}, r"repetition_penalty must be a finite number"),
    ],
)
def test_sampling_refuses_non_finite_values(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SamplingConfig().update(**kwargs)


@pytest.mark.parametrize(
    "text,pattern",
    [
        ('{"temperature": ', r"cannot read it as JSON"),
        ("[]", r"expected a JSON object, got list"),
        ('{"temperature": "hot"}', r"temperature must be a number, got 'hot'"),
        ('{"do_sample": true, "top_p": 5}', r"top_p must be in \(0, 1\], got 5"),
        ('{"repetition_penalty": Infinity}', r"repetition_penalty must be a finite number, got inf"),
        ('{"eos_token_id": ["x"]}', r"invalid literal for int"),
    ],
)
def test_generation_config_errors_name_the_file(tmp_path: pathlib.Path, text: str, pattern: str) -> None:
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=pattern) as info:
        SamplingConfig.from_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'generation_config.json'}: ")


def test_generation_config_values_still_read(tmp_path: pathlib.Path) -> None:
    raw = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9, "pad_token_id": 0, "eos_token_id": [2, 3]}
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    cfg = SamplingConfig.from_checkpoint(tmp_path)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.pad_token_id, cfg.eos_token_id) == (0.7, 0, 0.9, 0, (2, 3))
    assert SamplingConfig.from_checkpoint(tmp_path / "absent") == SamplingConfig()


@pytest.mark.parametrize(
    "options,message",
    [
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--do-sample", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        # 0 used to mean "every frame" (it is falsy) while -3 was an error
        (["--video", "clip.mp4", "--num-frames", "0"], "--num-frames must be >= 1, got 0"),
    ],
)
def test_cli_refuses_bad_generation_options_before_loading(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    # An empty directory: the options must be refused before the model is looked at.
    assert main(["generate", "--model", str(tmp_path), *options, "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"internvl-jax generate: error: {message}\n"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from internvl_jax.demo import make_demo_checkpoint

    return make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def test_cli_prompt_that_is_not_utf8(demo_dir: pathlib.Path) -> None:
    # Real bytes on the command line, as a shell passes them (the tokenizer used to raise a TypeError)
    for args, what in (([b"ok \xff"], "the prompt"), ([b"--system", b"\xc3(", b"hi"], "--system")):
        proc = subprocess.run([sys.executable, "-m", "internvl_jax.cli", "generate", "--model", str(demo_dir), *args],
                              capture_output=True, timeout=300)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.count("\n") == 1, err
        assert f"{what}: not valid UTF-8 (byte 0x" in err


def _options_without_help(help_text: str) -> list[str]:
    """Options in an argparse --help listing that have no help text of their own."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        match = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        if match is None or match.group(2):
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"^ {6,}\S", following):  # argparse puts a long option's help on the next line
            missing.append(match.group(1))
    return missing


@pytest.mark.parametrize("command", ["generate", "batch", "eval", "plan"])
def test_every_option_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--top-p" in out or command == "plan"
    assert _options_without_help(out) == []


def test_demo_model_prints_visible_text(demo_dir: pathlib.Path) -> None:
    """Its random weights used to answer with lone byte tokens, printed as U+FFFD."""
    from internvl_jax import InternVL, InternVLProcessor

    model, processor = InternVL.from_pretrained(demo_dir), InternVLProcessor.from_pretrained(demo_dir)
    for seed, prompt in enumerate(["Describe this image.", "hello", "Qu'est-ce que c'est ?"]):
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = inputs["input_ids"]
        out = np.asarray(model.generate(ids, None, inputs["attention_mask"], max_new_tokens=12, seed=seed))
        text = processor.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert re.fullmatch(r"[a-z ]{12}", text), repr(text)
