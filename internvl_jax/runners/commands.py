"""`internvl-jax batch` and `internvl-jax eval`: one driver, two kinds of input and of final output."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl_jax.cli_options import (
    add_generation_arguments,
    check_generation_arguments,
    generation_kwargs,
    model_kwargs,
)
from internvl_jax.runners import shards
from internvl_jax.runners.options import RunOptions
from internvl_jax.runners.records import Request, id_key, read_prompts
from internvl_jax.runners.shards import RunMismatch, Share


@dataclass(frozen=True)
class Job:
    """What a run needs besides the model: its requests, where its parts go, how the merge finishes."""

    kind: str
    requests: list[Request]
    base: Path  # part files are <base>.part<I>-of-<N>
    run_file: Path  # the run's settings (fingerprint)
    finish: Callable[[list[bytes]], str]  # merged lines (input order) -> writes the final files, says what


def template_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"num_frames": args.num_frames, "max_patches": args.max_patches}.items()
            if v is not None}


def resolve_share(args: argparse.Namespace) -> tuple[Share, bool]:
    """(this process's share, whether it runs under jax.distributed)."""
    if args.coordinator:
        if args.shard:
            raise ValueError("give either --shard or --coordinator/--num-processes/--process-id, not both")
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        return shards.init_distributed(args.coordinator, args.num_processes, args.process_id), True
    return (Share.parse(args.shard) if args.shard else Share()), False


def fingerprint(kind: str, args: argparse.Namespace, directory: Path, requests: Sequence[Request]) -> dict:
    """Everything that changes an answer: a resume or another process must use the same."""
    from internvl_jax.engine.sampling import SamplingConfig

    sampling = SamplingConfig.from_checkpoint(directory).update(**generation_kwargs(args))
    ids = hashlib.sha256("\n".join(id_key(r.id) for r in requests).encode("utf-8")).hexdigest()
    from internvl_jax.model.params import as_dtype

    # The dtype that runs (an unset --dtype is the backend's default): a run resumed with or without the flag, or
    # begun before the default depended on the backend, is the same run. Called after jax.distributed starts.
    dtype = as_dtype(args.dtype).name
    fp = {"kind": kind, "model": str(directory.resolve()), "dtype": dtype, "records": len(requests),
          "ids_sha256": ids, "generation": dataclasses.asdict(sampling), "template": template_kwargs(args),
          "system": args.system, "save_token_ids": args.save_token_ids,
          **({"profile": args.profile} if getattr(args, "profile", None) else {}),  # eval: its dataset profile
          # quantized weights or cache change answers; absent when not used, so earlier runs still resume
          **{k: v for k, v in model_kwargs(args).items() if v not in (None, "", "auto")}}
    if sampling.do_sample:  # the slot engine seeds each record by its row; static batches draw per batch
        fp["engine"] = "slots" if getattr(args, "slots", 0) else "static"
    return json.loads(json.dumps(fp))  # as it reads back from the file (tuples become lists)


def execute(job: Job, args: argparse.Namespace, share: Share, distributed: bool, directory: Path | None) -> int:
    requests = job.requests
    parts = shards.find_parts(job.base)

    def check(row: Any, rid: Any) -> str | None:
        if not isinstance(row, int) or not 0 <= row < len(requests):
            return f"row {row!r} is outside the input's {len(requests)} records"
        if id_key(requests[row].id) != id_key(rid):
            return f"row {row} has id {rid!r} but the input's record {row} has id {requests[row].id!r}"
        return None

    if not args.merge_only:
        own = shards.part_path(job.base, share)
        with shards.PartLock(own):  # before the done rows are read: a second run would redo the same ones
            shards.repair_tail(own)
            done = shards.load_done(shards.find_parts(job.base), check)
            pending = [r for r in requests if share.owns(r.row) and r.row not in done]
            mine = sum(share.owns(r.row) for r in requests)
            print(f"internvl-jax {job.kind}: process {share.index}/{share.count}: {mine} records, "
                  f"{mine - len(pending)} already done, {len(pending)} to do", file=sys.stderr)
            if pending:
                stats = _run(pending, own, args, distributed, directory)
                print(f"internvl-jax {job.kind}: process {share.index}/{share.count}: {stats.line()}",
                      file=sys.stderr)
        parts = shards.find_parts(job.base)
    if distributed:
        shards.barrier("internvl-jax-runner-finished")
        if share.index != 0:
            return 0  # process 0 merges, once
    lines, missing = shards.merged_lines(parts, len(requests), check)
    if lines is None:
        message = f"{missing} of {len(requests)} records are not done yet"
        if args.merge_only:
            raise RunMismatch(f"cannot merge: {message} (run the missing shards first)")
        print(f"internvl-jax {job.kind}: {message}; the last shard to finish writes the final output "
              "(or run again with --merge-only)", file=sys.stderr)
        return 0
    print(f"internvl-jax {job.kind}: {job.finish(lines)}", file=sys.stderr)
    return 0


def _run(pending: list[Request], part: Path, args: argparse.Namespace, distributed: bool, directory: Path):
    # Imported here: JAX and the model are needed only when there is something to generate.
    from internvl_jax.modeling import InternVL
    from internvl_jax.processing.processor import InternVLProcessor
    from internvl_jax.runners.batch import run_share

    mesh = None
    if args.mesh:
        if distributed:
            # The engine treats a mesh in a multi-process job as one global mesh fed in lockstep; runner
            # processes work independently, each on its own devices.
            raise ValueError("--mesh cannot be combined with --coordinator yet; use --shard per process")
        from internvl_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    if args.do_sample and not args.slots:
        print("internvl-jax: note: sampled answers depend on which rows share a batch, so a resumed or sharded "
              "run is not token-identical to an uninterrupted one (greedy runs are)", file=sys.stderr)
    model = InternVL.from_pretrained(directory, dtype=args.dtype, mesh=mesh, **model_kwargs(args))
    # eval: its profile's image backend, and no EXIF rotation (VLMEvalKit's PIL loading applies none).
    processor = InternVLProcessor.from_pretrained(directory, **getattr(args, "processor", {}))
    opts = run_options(args)
    with shards.PartWriter(part) as writer:
        return run_share(model, processor, pending, writer, opts)


def _model_dir(args: argparse.Namespace) -> Path:
    from internvl_jax.hub import resolve

    return Path(resolve(args.model))


def _failed(lines: Sequence[bytes]) -> int:
    return sum(json.loads(line).get("error") is not None for line in lines)


# ----- batch -----
def cmd_batch(args: argparse.Namespace) -> int:
    share, distributed = resolve_share(args)
    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        raise FileNotFoundError(f"--input {source} is not a file")
    run_file = output.with_name(output.name + ".run.json")
    check_outputs("--output", output, {"--input": source}, [output], run_file,
                  None if args.merge_only else shards.part_path(output, share))
    requests = read_prompts(source)

    def finish(lines: list[bytes]) -> str:
        shards.write_atomic(output, b"".join(lines))
        return f"wrote {len(lines)} results ({_failed(lines)} failed) to {output}"

    directory = None if args.merge_only else _model_dir(args)
    job = Job("batch", requests, output, run_file, finish)
    if directory is not None:
        shards.check_fingerprint(job.run_file, fingerprint("batch", args, directory, requests))
    return execute(job, args, share, distributed, directory)


# ----- eval -----
def cmd_eval(args: argparse.Namespace) -> int:
    from internvl_jax.runners import eval as ev
    from internvl_jax.runners import eval_cli

    if args.score:
        return eval_cli.score_file(args)
    if args.show_prompts is not None:
        return eval_cli.show_prompts(args)
    share, distributed = resolve_share(args)
    data, out = Path(args.data), Path(args.output)
    if not data.is_file():
        raise FileNotFoundError(f"--data {data} is not a file")
    if args.image_root and not Path(args.image_root).is_dir():
        raise FileNotFoundError(f"--image-root {args.image_root} is not a directory")
    check_eval_directory(out)
    check_outputs("--output", out, {"--data": data}, [out / "predictions.jsonl", out / "summary.json"],
                  out / "run.json", None if args.merge_only else shards.part_path(out / "results.jsonl", share))
    profile, items, dropped = eval_cli.load_items(args, data)
    # VLMEvalKit decodes greedily with its own token budget; the run records (and resumes with) the profile.
    args.do_sample = bool(args.do_sample)
    args.max_new_tokens = profile.max_new_tokens
    args.profile = profile.as_dict()
    args.processor = {"image_backend": profile.image_backend, "exif_transpose": False}
    requests = ev.requests_for(items, profile=profile)

    def finish(lines: list[bytes]) -> str:
        predictions, summary = ev.score(items, [json.loads(line) for line in lines], profile)
        summary = {"data": str(data), "dataset": profile.as_dict(), "dropped_without_image": dropped, **summary}
        shards.write_atomic(out / "predictions.jsonl",
                            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions).encode("utf-8"))
        shards.write_atomic(out / "summary.json",
                            (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        ev.write_report(summary, out / (profile.name + profile.report_suffix))
        mcq = summary.get("multiple_choice", {}).get("accuracy")
        em = summary.get("open", {}).get("exact_match", {}).get("accuracy")
        circular = summary.get("circular", {}).get("accuracy")
        scores = ", ".join(s for s in (mcq is not None and f"accuracy {mcq:.4f}",
                                       circular is not None and f"circular accuracy {circular:.4f}",
                                       em is not None and f"exact match {em:.4f}") if s)
        return (f"scored {len(items)} records ({summary['failed']} failed{', ' + scores if scores else ''}); "
                f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")

    out.mkdir(parents=True, exist_ok=True)
    directory = None if args.merge_only else _model_dir(args)
    job = Job("eval", requests, out / "results.jsonl", out / "run.json", finish)
    if directory is not None:
        shards.check_fingerprint(job.run_file, fingerprint("eval", args, directory, requests))
    return execute(job, args, share, distributed, directory)


# ----- output paths: checked before the input is read or the model loaded -----
def check_outputs(option: str, given: Path, inputs: dict[str, Path], finals: Sequence[Path], run_file: Path,
                  part: Path | None) -> None:
    """Every file the run writes under `option` `given` (`finals` by atomic rename, `run_file`, its `part`,
    appended to) can be written and is none of the `inputs` (by inode, whatever the spelling); final files that
    exist already must be a run's (its `run_file` beside them), never a user's file that the merge replaces."""

    def where(path: Path) -> str:
        return f"{option} {given}" if path == given else f"{option} {given}: {path}"

    for path in [*finals, run_file, *([part] if part is not None else [])]:
        if path.is_dir():
            raise ValueError(f"{where(path)} is a directory; the run writes a file there")
        for name, source in inputs.items():
            if path.exists() and os.path.samefile(path, source):
                raise ValueError(f"{where(path)} is the input file ({name} {source}); the run would overwrite "
                                 "it: choose another output path")
    existing = next(d for d in (run_file.parent, *run_file.parent.parents) if d.exists() or d == Path(d.anchor))
    if not existing.is_dir():
        raise ValueError(f"{where(existing)} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{where(existing)}: cannot write in this directory (permission denied)")
    if part is not None and part.exists() and not os.access(part, os.W_OK):
        raise ValueError(f"{where(part)} (this process's results) is not writable")
    foreign = [p for p in finals if p.exists()]
    if foreign and not run_file.exists():
        raise ValueError(f"{where(foreign[0])} exists and is not the output of a run of this tool (no "
                         f"{run_file.name} beside it); move it away or choose another output path")


def check_eval_directory(out: Path) -> None:
    """`eval --output` names a directory: an existing file there is refused, with a hint when it is a file
    of an eval run (its predictions or summary) rather than the run's directory."""
    if not out.exists() or out.is_dir():
        return
    if out.name in ("predictions.jsonl", "summary.json") and (out.parent / "run.json").is_file():
        raise ValueError(f"--output {out} is a file of the eval run in {out.parent}; --output names the run's "
                         f"directory: give --output {out.parent} to resume or score that run again")
    raise ValueError(f"--output {out} is an existing file; eval writes a directory (predictions.jsonl, "
                     "summary.json, its parts): give a directory path")


# ----- arguments -----
def add_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    if kind == "batch":
        p.add_argument("--input", required=True, help="JSONL: one {id, messages | prompt [+ images/video]} a line")
        p.add_argument("--output", required=True, help="results JSONL (written in input order at the end)")
    else:
        p.add_argument("--data", help="benchmark file: VLMEvalKit TSV or JSONL rows")
        p.add_argument("--output", help="directory for predictions.jsonl and summary.json")
        p.add_argument("--image-root", help="directory that relative image_path values are under "
                                            "(default: the data file's directory)")
    p.add_argument("--model", help="checkpoint directory (or a hub id); not needed with --merge-only")
    p.add_argument("--save-token-ids", action="store_true", help="also write each answer's token ids")
    p.add_argument("--slots", type=int, default=16,
                   help="decode slots of the continuous-batching engine: a record starts as soon as one frees "
                        "(default 16; 0: static batches of --batch-size)")
    p.add_argument("--cache-len", type=int, default=4096,
                   help="KV cache slots per decode slot: the longest prompt + answer a record may have (default "
                        "4096)")
    p.add_argument("--batch-size", type=int, default=8, help="with --slots 0: rows per generate call (default 8)")
    p.add_argument("--window", type=int, default=0,
                   help="with --slots 0: records encoded and sorted by length/tiles together (default 4 x batch "
                        "size)")
    p.add_argument("--system", help="system message for every record (eval: replaces the dataset profile's; '' "
                                    "for none)")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from each video")
    p.add_argument("--max-patches", type=int, default=None,
                   help="most tiles per image (processor default 12; eval: the dataset profile's)")
    add_generation_arguments(p)
    p.add_argument("--mesh", help="device mesh for this process, such as tensor=4 (default: one device)")
    p.add_argument("--shard", help="INDEX/COUNT: this independent process's share, e.g. 0/4")
    p.add_argument("--coordinator", help="jax.distributed coordinator address HOST:PORT")
    p.add_argument("--num-processes", type=int, help="jax.distributed process count")
    p.add_argument("--process-id", type=int, help="jax.distributed process index")
    p.add_argument("--merge-only", action="store_true", help="only merge finished parts (and score)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if kind == "eval":
        from internvl_jax.runners import eval_cli

        eval_cli.add_arguments(p)


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(slots=args.slots, cache_len=args.cache_len, batch_size=args.batch_size, window=args.window,
                      generation=generation_kwargs(args), template=template_kwargs(args),
                      save_token_ids=args.save_token_ids, progress=not args.no_progress)


def check_arguments(args: argparse.Namespace) -> None:
    if hasattr(args, "data_file"):  # eval
        if args.data and args.data_file:
            raise ValueError(f"give the data file once: --data {args.data} or {args.data_file}")
        args.data = args.data or args.data_file
        if not args.data and not args.score:
            raise ValueError("the benchmark file is required: --data DATA (or DATA)")
        if not args.output and args.score is None and args.show_prompts is None:
            raise ValueError("--output DIR is required (except with --score or --show-prompts)")
        if args.score:
            check_generation_arguments(args)
            return  # scoring needs no model
    if not args.merge_only and not args.model:
        raise ValueError("--model is required (except with --merge-only)")
    check_generation_arguments(args)  # --temperature inf, --num-frames 0, ...: named before anything loads
    run_options(args)
