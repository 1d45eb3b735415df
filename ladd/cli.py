"""`ladd <command>`: parses arguments, then calls one function per command.

    ladd toy tiny --out runs/tiny      # a random-weight tiny ZImagePipeline folder (offline)
    ladd demo                          # the end-to-end job on the embedded default
"""

from __future__ import annotations

import argparse
import os
import sys

def cmd_toy_tiny(args: argparse.Namespace) -> int:
    from ladd.models.tiny import TinyConfig, build_tiny_pipeline

    pipe = build_tiny_pipeline(TinyConfig(seed=args.seed))
    pipe.save_pretrained(args.out, safe_serialization=True)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote a tiny ZImagePipeline (seed {args.seed}, transformer {n / 1e6:.2f}M parameters) to {args.out}")
    return 0


def cmd_toy_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ladd.toy.build import ToyBuildConfig, build_toy, check_init, quick_config

    cfg = quick_config(seed=args.seed) if args.quick else ToyBuildConfig(seed=args.seed)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.buckets is not None:
        from ladd.data.buckets import BucketError, parse_buckets

        try:
            buckets = parse_buckets(args.buckets, factor=cfg.latent_factor())
        except BucketError as e:
            print(f"ladd toy build: {e}", file=sys.stderr)
            return 2
        cfg = replace(cfg, buckets=tuple(b.size for b in buckets))
    if args.adapt_steps is not None:
        cfg = replace(cfg, adapt_steps=args.adapt_steps)
    if args.init is not None:
        if len(cfg.buckets) == 1:
            print("ladd toy build: --init adapts a square build to --buckets; give --buckets too", file=sys.stderr)
            return 2
        try:
            check_init(args.init, cfg)
        except ValueError as e:
            print(f"ladd toy build: {e}", file=sys.stderr)
            return 2
    build_toy(args.out, cfg, init=args.init)
    return 0


def cmd_toy_prompts(args: argparse.Namespace) -> int:
    from ladd.toy.build import pipeline_world
    from ladd.toy.world import prompts

    lines = "\n".join(prompts(args.n, args.split, seed=args.seed, **pipeline_world(args.pipeline))) + "\n"
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        with open(args.out, "w") as f:
            f.write(lines)
        print(f"wrote {args.n} {args.split} prompts to {args.out}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.smoke:
        from ladd.smoke import run_smoke

        run_smoke(seed=args.seed)
        return 0
    from ladd.demo import DemoConfig, run_demo
    from ladd.models.loading import resolve_pipeline

    resolve_pipeline(args.pipeline)  # a missing toy teacher is one line saying how to rebuild it
    try:
        cfg = DemoConfig(out=args.out, seeds=args.seeds, quick=args.quick, pipeline=args.pipeline,
                         n_train=args.n_train, n_eval=args.n_eval, buckets=args.buckets, ablation=args.ablation,
                         curve_seeds=args.curve_seeds, jobs=args.jobs, eval_seeds=args.eval_seeds)
    except ValueError as e:  # counts below 1, a --buckets spec that is no set of sizes
        print(f"ladd demo: {e}", file=sys.stderr)
        return 2
    from ladd.data.precompute import PrecomputeError

    try:
        run_demo(cfg)
    except PrecomputeError as e:  # e.g. the demo's data folder was made with other arguments
        print(f"ladd demo: error: {e}", file=sys.stderr)
        return 2
    return 0


# Modules that add their own sub-command: each exposes `add_parser(sub)` which registers a parser
# whose default `func(args) -> int` runs it. Imported lazily inside `func`, so `ladd --help` is fast.
COMMAND_MODULES: list[str] = ["ladd.data.commands", "ladd.train.commands", "ladd.eval.commands", "ladd.sweep",
                              "ladd.plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ladd", description="Latent Adversarial Diffusion Distillation of Z-Image")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    toy = sub.add_parser("toy", help="tiny and toy Z-Image pipelines")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="<toy command>")
    tiny = toy_sub.add_parser("tiny", help="write a random-weight tiny ZImagePipeline folder")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_toy_tiny)

    build = toy_sub.add_parser("build", help="train the toy-world teacher pipeline from scratch (~CPU minutes)")
    build.add_argument("--out", required=True, help="output folder (the shipped one is ladd/toy/assets/toy-zimage)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--steps", type=int, default=None,
                       help="stage 1 (the square teacher) training steps (default: the build config's)")
    build.add_argument("--adapt-steps", type=int, default=None,
                       help="stage 2 steps on every bucket, with --buckets (default: the build config's)")
    build.add_argument("--init", default=None,
                       help="with --buckets: start from this square build (a folder `ladd toy build` wrote "
                            "without --buckets) instead of training stage 1; it must have this build's settings")
    build.add_argument("--quick", action="store_true", help="a one-minute smoke build (not a usable teacher)")
    build.add_argument("--buckets", default=None,
                       help="image sizes to train at: 'toy' (64x64, 80x48, 48x80) or WxH,WxH (multiples of 8; "
                            "weights ignored): the square teacher is trained at 64x64, then adapted to all; "
                            "default 64x64")
    build.set_defaults(func=cmd_toy_build)

    prompts = toy_sub.add_parser("prompts", help="write toy-world prompts, one per line")
    prompts.add_argument("--n", type=int, required=True)
    prompts.add_argument("--split", choices=("train", "eval"), default="train")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--out", default="-", help="a .txt file, or - for stdout")
    prompts.add_argument("--pipeline", default="toy", help="draw from the world this toy pipeline was built on")
    prompts.set_defaults(func=cmd_toy_prompts)

    demo = sub.add_parser("demo", help="the whole mission on the toy world: precompute, distill, evaluate, report")
    demo.add_argument("--out", default=None, help="default runs/demo (--quick: runs/demo-quick)")
    demo.add_argument("--seeds", type=int, default=None,
                      help="LADD training seeds, mean ± std over them (default 5; --quick: 1)")
    demo.add_argument("--quick", action="store_true",
                      help="one seed, a third of the steps, 128 + 128 prompts (unless given explicitly)")
    demo.add_argument("--pipeline", default="toy")
    demo.add_argument("--n-train", type=int, default=None, help="training prompts (default 256; --quick: 128)")
    demo.add_argument("--n-eval", type=int, default=None,
                      help="held-out eval prompts (default 192, with --buckets 128 per bucket if more; --quick: 128)")
    demo.add_argument("--buckets", default=None, metavar="SPEC",
                      help="train and evaluate on aspect-ratio buckets (e.g. 'toy': 64x64, 80x48, 48x80; the "
                           "teacher must know them); results per bucket; default runs/demo-buckets")
    demo.add_argument("--ablation", action="store_true",
                      help="also pure LADD (configs/toy-ladd.toml) and distillation alone, same data and seeds "
                           "(report.json `ablation`)")
    demo.add_argument("--curve-seeds", type=int, default=1,
                      help="seeds whose earlier checkpoints are scored too, for the KID-over-steps curve (default 1)")
    demo.add_argument("--jobs", type=int, default=None,
                      help="training runs at once, each in its own process with an equal share of the cores "
                           "(default: one per core; 1: in this process)")
    demo.add_argument("--eval-seeds", type=int, nargs="+", default=(1,), metavar="S",
                      help="fresh-noise eval seeds every row is scored at (default 1; each one costs a whole "
                           "evaluation; with two or more report.json also gives the gap closed at each)")
    demo.add_argument("--smoke", action="store_true", help="only the seconds-long foundation smoke run")
    demo.add_argument("--seed", type=int, default=0, help="seed of the smoke run")
    demo.set_defaults(func=cmd_demo)

    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input gets one line saying what is wrong; LADD_DEBUG=1 shows the traceback.
        if os.environ.get("LADD_DEBUG"):
            raise
        print(f"ladd {args.command}: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `ladd` command and `python -m ladd`: `main()`, then the exit.

    A torchrun worker (WORLD_SIZE > 1) leaves with os._exit once its output is flushed: its work is
    done and saved by then, and the interpreter's teardown is where torch's gloo threads can abort a
    finished rank ("terminate called without an active exception"), which torchrun reports as a
    failed job. An exception still leaves the ordinary way, with its traceback.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    entry()
