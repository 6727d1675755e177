"""Peak resident memory of the converter against checkpoint size (a benchmark, not a test: minutes, GBs of disk).

    python benchmarks/convert_memory.py [--preset InternVL3-1B] [--workdir /tmp/internvl_convert_bench] [--keep]

Each step runs in a fresh process, so the peak it reports (VmHWM from /proc/self/status) is its own:
  1. write a random checkpoint of the preset's shape: -hf safetensors, float32, 2 GB files plus index (written
     one parameter at a time, so this step does not hold the model either);
  2. convert it, to float32 and to bfloat16, as `python -m convert` does; also reported: the peak right after
     the imports, i.e. what the interpreter, jax and orbax cost before any weight is read;
  3. for comparison, the paths that do hold the whole model: `InternVL.from_pretrained` of the source
     safetensors and of the converted directory.
Prints a markdown table (docs/convert.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_PRELUDE = """
import json, sys, time
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_MAKE = _PRELUDE + """
import numpy as np, jax
from internvl_jax import InternVL, weights
from internvl_jax.export import export_params
from internvl_jax.presets import preset
config = preset(sys.argv[1])
abstract = weights.flatten_paths(InternVL.abstract_params(config, "float32"))
rng = np.random.default_rng(0)
def get(path):
    spec = abstract[path]
    return (rng.standard_normal(spec.shape, dtype=np.float32) * 0.02)
export_params(config, abstract, get, sys.argv[2], max_shard_size="2GB")
print(json.dumps({"hwm_mb": hwm_mb()}))
"""

_CONVERT = _PRELUDE + """
from convert import convert
after_imports = hwm_mb()
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], quantize=sys.argv[4] if len(sys.argv) > 4 else None,
        progress=False)
print(json.dumps({"hwm_mb": hwm_mb(), "imports_mb": after_imports, "seconds": time.perf_counter() - t}))
"""

_LOAD = _PRELUDE + """
from internvl_jax import InternVL
after_imports = hwm_mb()
t = time.perf_counter()
model = InternVL.from_pretrained(sys.argv[1], dtype="float32")
print(json.dumps({"hwm_mb": hwm_mb(), "imports_mb": after_imports, "seconds": time.perf_counter() - t}))
"""


def _run(code: str, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"step failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="InternVL3-1B")
    ap.add_argument("--workdir", default="/tmp/internvl_convert_bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "hf"
    t = time.perf_counter()
    made = _run(_MAKE, args.preset, str(src))
    print(f"made {src} ({_size(src):.2f} GB) in {time.perf_counter() - t:.0f} s, peak {made['hwm_mb']:.0f} MB",
          file=sys.stderr)
    rows = []
    for dtype, *quantize in (("float32",), ("bfloat16",), ("bfloat16", "int8"), ("bfloat16", "int4")):
        dst = work / f"converted_{dtype}{''.join(quantize)}"
        r = _run(_CONVERT, str(src), str(dst), dtype, *quantize)
        rows.append((f"convert to {dtype}{''.join(f' --quantize {q}' for q in quantize)}", r, _size(dst)))
        print(rows[-1], file=sys.stderr)
    rows.append(("InternVL.from_pretrained(source safetensors), for comparison", _run(_LOAD, str(src)), None))
    rows.append(("InternVL.from_pretrained(converted float32), for comparison",
                 _run(_LOAD, str(work / "converted_float32")), None))

    size = _size(src)
    print(f"\nMachine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"preset {args.preset}, source {size:.2f} GB float32 safetensors ({len(list(src.glob('*.safetensors')))} "
          "files)\n")
    print("| step | peak RSS (VmHWM) | peak after imports only | peak / source size | time | output |")
    print("|---|---|---|---|---|---|")
    for name, r, out in rows:
        print(f"| {name} | {r['hwm_mb'] / 1024:.2f} GiB | {r['imports_mb'] / 1024:.2f} GiB | "
              f"{r['hwm_mb'] * 2**20 / (size * 1e9):.2f} | {r['seconds']:.0f} s | "
              f"{f'{out:.2f} GB' if out is not None else '-'} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
