"""Bad inputs to the CLI, table-driven: exit status 2, one line on stderr that names the culprit, no traceback,
and no file of the user's changed. Each row was a traceback or a silent wrong answer before (issue 19)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from internvl_jax import InternVL
from internvl_jax.cli import main as cli_main
from tests import tiny_models as tm

HEAD = "language_model.lm_head.weight"  # the older -hf key layout that save_pretrained writes
SOME_WEIGHT = "language_model.model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A good tiny -hf checkpoint and broken copies of it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good, _ = tm.make(root, seed=3)
    tensors = load_file(str(good / "model.safetensors"))
    config = json.loads((good / "config.json").read_text())

    def variant(name: str, edit_tensors=None, edit_config=None) -> Path:
        d = root / name
        d.mkdir()
        t = dict(tensors)
        if edit_tensors:
            edit_tensors(t)
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(edit_config(dict(config)) if edit_config else config))
        return d

    def nan(t: dict) -> None:
        w = t[SOME_WEIGHT].copy()
        w[3, 5] = np.nan
        t[SOME_WEIGHT] = w

    (root / "prompts.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]}))
    return {
        "root": root,
        "good": good,
        "llava": variant("llava", edit_config=lambda c: c | {"model_type": "llava"}),
        "int_head": variant("int_head", lambda t: t.update({HEAD: t[HEAD].astype(np.int32)})),
        "nan": variant("nan", nan),
    }


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (name, argv with {good}/{llava}/... placeholders, what the one line must say)
CASES = [
    ("plan: unknown preset", ["plan", "--preset", "3B"], r"unknown preset '3B'; known: InternVL3-1B"),
    ("plan: negative batch", ["plan", "--batch", "-1"], r"batch must be >= 1, got -1"),
    ("plan: zero length", ["plan", "--seq", "0"], r"seq must be >= 1, got 0"),
    ("plan: negative tiles", ["plan", "--tiles", "-2"], r"tiles must be >= 0, got -2"),
    ("plan: mesh axis of size 0", ["plan", "--mesh", "tensor=0"], r"axis 'tensor' has size 0"),
    ("plan: mesh without sizes", ["plan", "--mesh", "nonsense"], r"mesh 'nonsense': expected AXIS=SIZE pairs"),
    ("plan: mesh size not a number", ["plan", "--mesh", "tensor=x"], r"size 'x' of axis 'tensor' is not a whole"),
    ("plan: unknown mesh axis", ["plan", "--mesh", "model=2"], r"mesh axis 'model' is not one of"),
    ("plan: -1 in the planner", ["plan", "--mesh", "tensor=-1"], r"the planner needs every axis size"),
    ("generate: mesh without sizes", ["generate", "--model", "{good}", "--mesh", "nonsense", "hi"],
     r"mesh 'nonsense': expected AXIS=SIZE"),
    ("generate: mesh larger than the machine", ["generate", "--model", "{good}", "--mesh", "data=3", "hi"],
     r"has 3 devices but 1 are available"),
    ("generate: not an InternVL config", ["generate", "--model", "{llava}", "hi"],
     r"config.json: model_type='llava' is not an InternVL model"),
    ("generate: integer lm_head", ["generate", "--model", "{int_head}", "hi"],
     rf"tensor '{HEAD}' is int32, but parameter 'text/lm_head' holds floating-point weights"),
    ("batch: no frames", ["batch", "--model", "{good}", "--input", "{root}/prompts.jsonl", "--output",
                          "{root}/out.jsonl", "--num-frames", "0"], r"--num-frames must be >= 1, got 0"),
    ("eval: infinite temperature", ["eval", "--model", "{good}", "--data", "{root}/prompts.jsonl", "--output",
                                    "{root}/run", "--do-sample", "--temperature", "inf"], r"--temperature"),
    ("generate: NaN in a weight", ["generate", "--model", "{nan}", "hi"],
     rf"tensor '{SOME_WEIGHT}' holds 1 non-finite value\(s\) \(NaN or inf\)"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(checkpoints, argv, message, capsys):
    import re

    root = checkpoints["good"].parent
    before = tree_hash(root)
    rc = cli_main([a.format(**checkpoints) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and re.search(message, err), err
    assert tree_hash(root) == before  # nothing of the user's changed


def test_mesh_without_some_of_our_axes_is_taken_as_size_one(checkpoints):
    """A user's own Mesh(devices, ("data", "tensor")) (no fsdp axis) loads and generates as on one device."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    plain = InternVL.from_pretrained(checkpoints["good"])
    meshed = InternVL.from_pretrained(checkpoints["good"], mesh=mesh)
    ids = np.array([[5, 9, 11, 13, 17]])
    np.testing.assert_array_equal(meshed.generate(ids, max_new_tokens=6), plain.generate(ids, max_new_tokens=6))
