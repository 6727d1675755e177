"""`internvl-jax`: generate | demo | convert | export | batch | eval | bench | plan | parity."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence

from internvl_jax.cli_options import (
    add_generation_arguments,
    check_generation_arguments,
    generation_kwargs,
    model_kwargs,
)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", required=True, help="checkpoint directory (or a hub id, downloaded when online)")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", help="video path")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from --video")
    p.add_argument("--system", help="system message")
    add_generation_arguments(p)
    p.add_argument("--mesh", help="device mesh such as data=2,tensor=4 (default: one device)")
    p.add_argument("--coordinator", help="host:port of process 0: join a jax.distributed job (multi-host)")
    p.add_argument("--num-processes", type=int, help="with --coordinator: how many processes the job has")
    p.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 .. N-1")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, timings")


def messages_for(args: argparse.Namespace) -> list[dict]:
    content: list[dict] = [{"type": "image", "url": i} for i in args.image]
    if args.video:
        content.append({"type": "video", "url": args.video})
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    if args.system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": args.system}]})
    return messages


def cmd_generate(args: argparse.Namespace) -> int:
    from internvl_jax.engine.streaming import TextStreamer
    from internvl_jax.hub import resolve
    from internvl_jax.modeling import InternVL
    from internvl_jax.processing.loading import check_text
    from internvl_jax.processing.processor import InternVLProcessor

    # Bad options and text fail here, in one line, before minutes of loading.
    check_text(args.prompt, "the prompt")
    if args.system is not None:
        check_text(args.system, "--system")
    check_generation_arguments(args)
    if args.coordinator:  # every process runs this same command with its own --process-id
        from internvl_jax import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    t0 = time.perf_counter()
    directory = resolve(args.model)
    mesh = None
    if args.mesh:
        from internvl_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    model = InternVL.from_pretrained(directory, dtype=args.dtype, mesh=mesh, **model_kwargs(args))
    processor = InternVLProcessor.from_pretrained(directory)
    t1 = time.perf_counter()
    template_kwargs = {"num_frames": args.num_frames} if args.num_frames is not None else {}
    inputs = processor.apply_chat_template([messages_for(args)], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, padding=True, return_tensors="np", **template_kwargs)
    t2 = time.perf_counter()
    gen = generation_kwargs(args)
    first: list[float] = []

    def decode(ids: list[int]) -> str:
        return processor.decode(ids, skip_special_tokens=True)

    def on_text(piece: str) -> None:
        if not first:
            first.append(time.perf_counter())
        if args.stream and not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    streamer = TextStreamer(decode, on_text=on_text) if args.stream else None
    ids = inputs["input_ids"]
    out = model.generate(ids, inputs.get("pixel_values"), inputs.get("attention_mask"), streamer=streamer, **gen)
    t3 = time.perf_counter()
    new = [int(t) for t in out[0, ids.shape[1]:]]
    text = decode(new)
    if args.json:
        print(json.dumps({
            "text": text, "token_ids": new, "prompt_tokens": int(ids.shape[1]),
            "timings": {"load_s": round(t1 - t0, 4), "preprocess_s": round(t2 - t1, 4),
                        "generate_s": round(t3 - t2, 4),
                        "first_text_s": round(first[0] - t2, 4) if first else None,
                        "new_tokens_per_s": round(len(new) / max(t3 - t2, 1e-9), 2)},
        }))
    elif args.stream:
        print()
    else:
        print(text)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from internvl_jax.model.params import default_dtype, precision, precision_line
    from internvl_jax.planner import parse_bytes, plan
    from internvl_jax.quant import check_scheme
    from internvl_jax.sharding import parse_mesh_spec
    from internvl_jax.targets import parse_target

    target = parse_target(args.target)
    from internvl_jax.presets import shape_of

    config = shape_of(args.preset)
    args.dtype = args.dtype or default_dtype(target.kind)  # for the target's backend, not this machine's
    sizes = parse_mesh_spec(args.mesh)
    mesh = {a: n for a, n in sizes.items() if n != 1}
    memory = parse_bytes(args.device_memory) if args.device_memory else (target.chip.hbm if target.chip else None)
    quant = check_scheme(args.quantize)
    weights = f" weights {quant}" if quant else ""
    header = (f"{args.preset} {args.dtype}{weights}, mesh {mesh or '{single device}'}, batch {args.batch} x {args.seq} "
              f"tokens, {args.tiles} tiles")
    if target.topology is not None:
        return _compiled_plan(args, config, target, sizes, header)
    result = plan(config, mesh, args.batch, args.seq, args.tiles, args.dtype, memory, quant)
    if args.json:
        print(json.dumps({"target": target.label, "mesh": mesh, "batch": args.batch, "context": args.seq,
                          "tiles": args.tiles, "dtype": args.dtype, "quantize": quant or None, "per_device_bytes": {
                              "weights": result.weights, "kv_cache": result.cache,
                              "activations_estimate": result.activations, "total": result.total},
                          "device_memory": result.device_memory, "fits": result.fits,
                          "precision": precision(args.dtype, target.kind)}, indent=1))
    else:
        print(header)
        print(result.report())
        print(precision_line(precision(args.dtype, target.kind)))
    return 0 if result.fits in (None, True) else 1


def _compiled_plan(args: argparse.Namespace, config, target, sizes: dict[str, int], header: str) -> int:
    """`plan --target tpu:...|gpu:...`: compiled for the target on abstract weights (see internvl_jax/compiled.py)."""
    from internvl_jax.compiled import compiled_plan
    from internvl_jax.model.params import precision, precision_line
    from internvl_jax.planner import plan

    plan(config, {}, args.batch, args.seq, args.tiles, args.dtype)  # the same checks of batch, length, tiles
    result = compiled_plan(config, target, sizes, args.batch, args.seq, args.tiles, args.dtype, args.quantize)
    # The compiled programs trace the pure-JAX attention: a Pallas call is not split by XLA over a mesh (the
    # kernels are compiled alone in tests/test_kernels.py; docs/kernels.md).
    prec = {**precision(args.dtype, target.kind), "attention": "reference"}
    if args.json:
        print(json.dumps({**result.as_dict(), "precision": prec}, indent=1))
    else:
        print(f"{header}, target {target.label}")
        print(result.report())
        print(precision_line(prec))
    return 0 if result.headroom >= 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from convert.cli import run_command
    from internvl_jax.demo import make_demo_checkpoint

    # The same exit statuses and one-line errors as convert / export, which write their output the same way.
    status = run_command(make_demo_checkpoint, args.out, seed=args.seed, force=args.force)
    if status == 0:
        print(f"wrote a random-weight demo checkpoint to {args.out}")
    return status


# ----- batch / eval runners (internvl_jax/runners; see docs/runners.md) -----
def _add_runner_commands(sub: argparse._SubParsersAction) -> None:
    from internvl_jax.runners.commands import add_arguments

    add_arguments(sub.add_parser("batch", help="answer a JSONL file of prompts (resumable, shardable)"), "batch")
    add_arguments(sub.add_parser("eval", help="score a benchmark (VLMEvalKit TSV / JSONL): resumable, shardable"),
                  "eval")


def cmd_batch(args: argparse.Namespace) -> int:
    from internvl_jax.runners import commands

    commands.check_arguments(args)
    return commands.cmd_batch(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from internvl_jax.runners import commands

    commands.check_arguments(args)
    return commands.cmd_eval(args)


RUNNER_COMMANDS = {"batch": cmd_batch, "eval": cmd_eval}
# ----- end of the runners block -----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="internvl-jax", description="InternVL3 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub.add_parser("generate", help="answer one prompt (with images or a video)"))
    demo = sub.add_parser("demo", help="write a small random-weight checkpoint (no download needed)")
    demo.add_argument("out", help="directory to create")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="replace an earlier checkpoint of ours at OUT")
    sub.add_parser("convert", help="PyTorch safetensors -> orbax (see: internvl-jax convert --help)", add_help=False)
    sub.add_parser("export", help="our checkpoint -> -hf safetensors (see: internvl-jax export --help)",
                   add_help=False)
    _add_runner_commands(sub)
    sub.add_parser("bench", help="speed of a family-shape model, optionally beside torch (bench --help)",
                   add_help=False)
    sub.add_parser("parity", help="logits and every stage against transformers (torch), with the first that "
                   "diverges (parity --help)", add_help=False)
    from internvl_jax.training import finetune_cli

    finetune_cli.add_arguments(sub.add_parser("finetune", help="fine-tune a checkpoint on conversations (optax)"))
    p = sub.add_parser("plan", help="per-device memory of a preset on a mesh (no allocation)")
    p.add_argument("--preset", default="InternVL3-1B",
                   help="model shape: a preset name, a size such as 8B, or a checkpoint directory "
                   "(default InternVL3-1B)")
    p.add_argument("--mesh", default="", help="e.g. data=2,tensor=4 (default: one device)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated together (default 1)")
    p.add_argument("--seq", type=int, default=4096, help="prompt + new tokens per sequence")
    p.add_argument("--tiles", type=int, default=13, help="448px tiles in the batch (12 + thumbnail per image)")
    p.add_argument("--dtype", help="weight and activation dtype: bfloat16 or float32 (default: the target's, "
                   "bfloat16 on TPU and GPU, float32 on cpu)")
    p.add_argument("--device-memory", help="e.g. 80GB: also say whether it fits")
    p.add_argument("--quantize", default=None, metavar="{int8,int4}", help="weights stored int8 or int4 (with "
                   "their scales): count their bytes")
    p.add_argument("--target", default="cpu", help="cpu (analytic plan), tpu:GENERATION:GRID (compiled for that "
                   "topology, e.g. tpu:v5p:2x2x2; needs the tpu extra), gpu:CHIPxCOUNT (compiled, e.g. gpu:h100x8; "
                   "needs the gpu-plan extra) or h100/h200 (analytic, their HBM)")
    p.add_argument("--context", dest="seq", type=int, default=argparse.SUPPRESS, help="same as --seq")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("convert", "export"):
        import convert.__main__ as conv

        return int(getattr(conv, f"{argv[0]}_main")(argv[1:], prog=f"internvl-jax {argv[0]}") or 0)
    if argv and argv[0] == "bench":
        from internvl_jax.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "parity":
        from internvl_jax.parity import main as parity_main

        return parity_main(argv[1:])
    args = parser.parse_args(argv)
    from internvl_jax.interrupts import held, redelivered

    try:
        with redelivered():
            if args.command == "generate" or (args.command in RUNNER_COMMANDS and not args.merge_only):
                with held():  # an import of jaxlib that is interrupted half-way crashes the process
                    import jax  # noqa: F401
            commands = {"generate": cmd_generate, "demo": cmd_demo, "plan": cmd_plan,
                        "finetune": finetune_cli.command, **RUNNER_COMMANDS}
            return commands[args.command](args)
    except (FileNotFoundError, ValueError, MemoryError) as e:
        # User errors get one line naming the problem, not a traceback.
        print(f"internvl-jax {args.command}: error: {e or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status for SIGINT. A runner's finished records are on disk already
        # (each batch is fsynced before the next starts), so the same command resumes.
        kept = "; the records finished so far are kept: run the same command again to resume" \
            if args.command in RUNNER_COMMANDS else ""
        print(f"internvl-jax {args.command}: interrupted{kept}", file=sys.stderr)
        if from_command_line:
            # An interrupt inside an XLA compilation leaves jaxlib in a state that Python's finalization may crash
            # on (SIGSEGV in nanobind's module free: exit -11 in about 1 interrupt of 3). Everything of ours is
            # closed and on disk by now, so leave without finalizing.
            with contextlib.suppress(OSError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
