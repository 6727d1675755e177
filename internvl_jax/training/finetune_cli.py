"""`internvl-jax finetune`: the command line of `training.finetune` (argparse only until it runs)."""

from __future__ import annotations

from typing import Any


def add_arguments(p: Any) -> None:
    from internvl_jax.training.options import FinetuneOptions

    d = FinetuneOptions()
    p.add_argument("--model", required=True, help="checkpoint directory to start from")
    p.add_argument("--data", required=True, help="training JSONL (batch's record form, with assistant turns)")
    p.add_argument("--out", required=True, help="directory for checkpoints, loss.jsonl, loss.png and model/")
    p.add_argument("--heldout", help="held-out JSONL: loss and token accuracy at every checkpoint")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer updates (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows a pass (default {d.batch_size})")
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="passes an update (gradient accumulation)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help=f"peak (default {d.learning_rate})")
    p.add_argument("--warmup", type=int, help="warm-up updates (default: a tenth of --steps)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="global gradient norm clip")
    p.add_argument("--freeze", default="", help="comma-separated parts not trained: vision, projector, language")
    p.add_argument("--save-every", type=int, default=d.save_every, help="updates between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="data order")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens a conversation may have")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--mesh", help="device mesh such as data=2,tensor=4 (default: one device)")
    p.add_argument("--no-progress", action="store_true")


def options_from(args: Any) -> Any:
    from internvl_jax.training.options import FinetuneOptions

    return FinetuneOptions(steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate,
                           learning_rate=args.learning_rate, warmup=args.warmup, weight_decay=args.weight_decay,
                           clip=args.clip, freeze=tuple(f for f in args.freeze.split(",") if f),
                           save_every=args.save_every, seed=args.seed, max_length=args.max_length,
                           strict=args.strict)


def command(args: Any) -> int:
    opts = options_from(args)  # bad options named before anything loads
    mesh = None
    if args.mesh:
        from internvl_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    from internvl_jax.training.finetune import finetune

    print(finetune(args.model, args.data, args.out, opts, heldout=args.heldout, mesh=mesh,
                   progress=not args.no_progress))
    return 0
