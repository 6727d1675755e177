"""The safetensors reader against corrupt and hostile files: random headers (random JSON, lengths, offsets,
dtypes, shapes), truncated files and huge claims. The only error allowed is the named `CheckpointError`,
and nothing read may allocate more than the file holds (a header is not trusted with a size)."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from internvl_jax.cli import main as cli_main
from internvl_jax.safetensors_io import _DTYPES, CheckpointError, SafetensorsDir, SafetensorsFile

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Sizes a header may claim: small, around a file's size, tens of MB (would be allocated: tracemalloc sees it),
# and far beyond memory (8 GB, 1 TB, 2**64 - 1).
SIZES = st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 1 << 26),
                  st.sampled_from([8 << 30, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]))
KNOWN = st.sampled_from(sorted(_DTYPES))
DTYPES = st.one_of(KNOWN, KNOWN, KNOWN, st.sampled_from(["U16", "F4", "C64", "", "f32"]), st.text(max_size=4))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)


@st.composite
def entry(draw, begin: int) -> tuple[dict | object, int]:
    """(a header entry whose data starts at `begin`, its data length): well formed most of the time, so that
    reading is reached, with any field sometimes replaced by a claim or by random JSON."""
    dtype = draw(DTYPES)
    shape = draw(st.lists(st.integers(0, 6), max_size=3))
    itemsize = np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else 1
    end = begin + math.prod(shape) * itemsize
    e: dict = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    change = draw(st.sampled_from([None] * 12 + ["dtype", "shape", "data_offsets", "claim", "entry"]))
    if change == "claim":  # a shape and offsets that agree, far beyond the file
        count = draw(SIZES)
        e.update(shape=[count], data_offsets=[begin, begin + count * itemsize])
    elif change == "entry":
        return draw(JSON), end - begin
    elif change is not None:
        e[change] = draw(st.one_of(JSON, st.lists(SIZES, max_size=3)))
    return e, end - begin


@st.composite
def files(draw) -> bytes:
    """Bytes of a would-be safetensors file."""
    kind = draw(st.sampled_from(["entries", "entries", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    data = b""
    if kind == "json":
        header = json.dumps(draw(JSON)).encode()
    else:
        fields: dict = {}
        for key in draw(st.lists(st.text(max_size=6), max_size=4, unique=True)):
            fields[key], length = draw(entry(len(data)))
            data += draw(st.binary(min_size=length, max_size=length))
        if draw(st.booleans()):
            fields["__metadata__"] = {"format": "pt"}
        header = json.dumps(fields).encode()
    n = draw(st.one_of(st.just(len(header)), st.just(len(header)), SIZES))
    blob = struct.pack("<Q", n) + header + data + draw(st.binary(max_size=16))
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, len(blob))))  # a truncated download
    return blob if cut is None else blob[:cut]


def read_all(path: Path) -> list[np.ndarray]:
    f = SafetensorsFile(path)
    return [f.get(k) for k in f.keys()]


@FUZZ
@given(blob=files())
def test_reader_fails_only_with_checkpoint_error_and_never_allocates_past_the_file(tmp_path, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        tensors = read_all(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        tensors = []
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Parsing the header costs a few times its size; a tensor buffer claimed by the header beyond the file
    # would be megabytes to terabytes.
    assert peak <= 64 * len(blob) + (1 << 20), f"{peak} bytes allocated for a {len(blob)}-byte file"
    assert sum(t.nbytes for t in tensors) <= len(blob)


@FUZZ
@given(arrays=st.dictionaries(st.text(min_size=1, max_size=8), st.tuples(
    st.sampled_from(["float32", "float16", "int64", "int8", "uint8", "bool"]),
    st.lists(st.integers(0, 5), max_size=3)), max_size=4), seed=st.integers(0, 2**32 - 1))
def test_files_written_by_safetensors_read_back_exactly(tmp_path, arrays, seed):
    rng = np.random.default_rng(seed)
    tensors = {k: rng.integers(0, 100, size=shape).astype(dtype) for k, (dtype, shape) in arrays.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for k, t in tensors.items():
        got = f.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and np.array_equal(got, t)


@FUZZ
@given(index=st.one_of(JSON, st.fixed_dictionaries({"weight_map": JSON}),
                       st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), st.sampled_from(
                           ["model.safetensors", "missing.safetensors", ""]), max_size=3)})))
def test_index_fails_only_with_checkpoint_error(tmp_path, index):
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        reader = SafetensorsDir(tmp_path)
    except CheckpointError as e:
        assert "model.safetensors" in str(e) or str(tmp_path) in str(e)
    else:
        assert set(reader.keys()) <= {"a"}


def claim(path: Path, key: str, nbytes: int, keep_shape: bool = False) -> None:
    """Rewrite `path`'s header so that tensor `key` claims `nbytes` bytes at the end of the data (with a shape
    that agrees, or its own)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + n])
    begin = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    itemsize = np.dtype(_DTYPES[header[key]["dtype"]]).itemsize
    header[key]["data_offsets"] = [begin, begin + nbytes]
    if not keep_shape:
        header[key]["shape"] = [nbytes // itemsize]
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + n:])


@pytest.mark.parametrize("nbytes", [8 << 30, 1 << 40])
def test_huge_claims_are_refused_before_reading(tmp_path, nbytes):
    path = tmp_path / "model.safetensors"
    save_file({"small": np.ones(4, np.float32), "big": np.ones((600, 1000), np.float32)}, str(path))  # 2.4 MB
    claim(path, "big", nbytes)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'big': data_offsets .* do not lie within"):
        SafetensorsFile(path)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_huge_claim_is_one_line_in_generate_and_convert(tmp_path, command, capsys):
    from internvl_jax.demo import make_demo_checkpoint

    directory = make_demo_checkpoint(tmp_path / "demo")
    path = directory / "model.safetensors"
    key = SafetensorsFile(path).keys()[0]
    claim(path, key, 1 << 40, keep_shape=True)  # the shape the config expects: only the offsets lie
    args = ["generate", "--model", str(directory), "hi"] if command == "generate" else \
        ["convert", str(directory), str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tensor {key!r}: data_offsets" in err and str(path) in err, err
