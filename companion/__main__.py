"""Command line: ``python -m companion bench conv``, ``python -m companion train cnn`` ...

``torchrun --nproc_per_node N -m companion train cnn`` trains data-parallel in N processes (one per GPU).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from companion import distributed, exercises
from companion.runtime import device, env_flag, precision_name, quick


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, a whole number from 0 to 2**32 - 1 (what NumPy's generator accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number from 0 to 4294967295, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"from 0 to 4294967295, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen benchmark or training recipe."""
    parser = argparse.ArgumentParser(prog="python -m companion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="print speed figures (benchmarks, not tests)")
    bench.add_argument("what", choices=["conv", "attention", "text", "step"])
    bench.add_argument(
        "--device", default=None, help="cpu, cuda or mps (default: the best available; cpu for the text encoder)"
    )

    train = sub.add_parser("train", help="train a model with the book's recipe and report accuracy")
    train.add_argument("what", choices=["cnn", "vit", "llm"])
    train.add_argument("--quick", action="store_true", help="small subset and few epochs (also COMPANION_QUICK=1)")
    train.add_argument("--epochs", type=positive_int, default=None, help="override the recipe's number of epochs")
    train.add_argument("--data", default=None, help="data root (default: $COMPANION_DATA or the user cache)")
    train.add_argument("--seed", type=seed_int, default=0, help="seed of everything random (default 0)")
    train.add_argument(
        "--save",
        default=None,
        help="write the trained weights to this .safetensors file (its folder must exist); also writes a checkpoint "
        "beside it after every epoch (NAME.ckpt), unless --checkpoint says where",
    )
    train.add_argument(
        "--checkpoint", default=None, help="write a checkpoint to this file after every epoch (default with --save)"
    )
    train.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved in this checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing weights or checkpoint file (never by default)"
    )

    precision_help = (
        "bf16 (bfloat16 autocast), fp32, or auto (default: bf16 on CUDA and on CPUs with native bfloat16); "
        "also COMPANION_PRECISION"
    )
    train.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None, help=precision_help)

    ablate = sub.add_parser("ablate", help="train a recipe with each ingredient changed in turn, over seeds")
    ablate.add_argument("what", choices=["cnn", "vit"])
    ablate.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 for every variant (default 3)")
    ablate.add_argument("--quick", action="store_true", help="small subset and few epochs (also COMPANION_QUICK=1)")
    ablate.add_argument("--epochs", type=positive_int, default=None, help="override the recipe's number of epochs")
    ablate.add_argument("--data", default=None, help="data root (default: $COMPANION_DATA or the user cache)")
    ablate.add_argument("--only", default=None, help="comma-separated ingredient names (default: all)")
    ablate.add_argument("--n-train", type=positive_int, default=None, help="train on this many images (default: all)")
    ablate.add_argument("--n-test", type=positive_int, default=None, help="test on this many images (default: all)")
    ablate.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None, help=precision_help)

    compare = sub.add_parser("compare", help="train the models a chapter compares, over seeds: means and a verdict")
    compare.add_argument("what", choices=["vit-vs-cnn", "text-vs-linear-head"])
    compare.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 for every model (default 3)")
    compare.add_argument("--quick", action="store_true", help="small subset and few epochs (also COMPANION_QUICK=1)")
    compare.add_argument("--data", default=None, help="data root (default: $COMPANION_DATA or the user cache)")
    compare.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None, help=precision_help)

    exercises.add_parser(sub)

    args = parser.parse_args(argv)
    if getattr(args, "precision", None) is not None:  # what "auto" means for every run of this command
        os.environ["COMPANION_PRECISION"] = args.precision
    if args.command == "exercises":
        return exercises.main(args)
    if args.command == "ablate":
        return _ablate(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "bench":
        from companion import bench as benchmarks

        if args.device is not None:
            try:
                benchmarks.check_device(args.device)  # before any model or data loads
            except RuntimeError as err:
                parser.error(str(err))
        getattr(benchmarks, f"bench_{args.what}")(device=args.device)
    else:
        return _train(args)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    """``ablate cnn|vit``: the recipe with each ingredient changed, over seeds; a table of means and verdicts."""
    import torch

    from companion.ablation import INGREDIENTS, ablate, format_ablation

    only = None if args.only is None else [name.strip() for name in args.only.split(",")]
    if only is not None and set(only) - set(INGREDIENTS[args.what]):
        known = "; ".join(INGREDIENTS[args.what])
        print(f"python -m companion ablate: error: unknown ingredients {only}; choose from: {known}", file=sys.stderr)
        return 2
    quick_mode = args.quick or quick()
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    rows = ablate(args.what, args.seeds, quick_mode, args.epochs, only, root=args.data, **sizes)
    mode = "quick" if quick_mode else "full"
    scale = "".join(f", {v:,} {k[2:]} images" for k, v in sizes.items())
    print(f"Ablation of the {args.what} recipe, {mode} mode{scale}, {args.seeds} seeds (accuracy with its TTA)")
    print(format_ablation(rows))
    dev = device()
    print(f"device {dev}, {precision_name(dev)} | torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``compare vit-vs-cnn|text-vs-linear-head``: a chapter's models over seeds; a table of means and the verdict."""
    import torch

    from companion.ablation import compare, format_ablation

    quick_mode = args.quick or quick()
    rows = compare(args.what, args.seeds, quick_mode, root=args.data)
    mode = "quick" if quick_mode else "full"
    print(f"Comparison {args.what}, {mode} mode, {args.seeds} seeds (accuracy with each recipe's TTA)")
    print(format_ablation(rows))
    for row in rows:  # each seed's figures, for a record
        runs = ", ".join(f"seed {s}: {a:.4f} in {t:.1f} s" for s, (a, t) in enumerate(zip(row.accuracies, row.seconds)))
        print(f"{row.name}: {runs}")
    dev = device()
    print(f"device {dev}, {precision_name(dev)} | torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    return 0


def _train(args: argparse.Namespace) -> int:
    """``train cnn|vit|llm``: the recipe's run; one-line errors for bad paths and checkpoints; 128+N on signal N."""
    from companion.checkpoint import ResumeError
    from companion.data import DataError
    from companion.train import TrainingInterrupted

    try:  # the environment's flags, before anything loads: a value they do not know is a usage error
        quick_mode = args.quick or quick()
        for flag in ("COMPANION_DOWNLOAD", "COMPANION_ALLOW_PARTIAL"):
            env_flag(flag)
        precision_name(device())  # COMPANION_PRECISION, if set, must be a precision
    except ValueError as err:
        print(f"python -m companion train: error: {err}", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint
    if checkpoint is None and args.save is not None:  # beside the weights: vit.safetensors -> vit.ckpt
        save = Path(args.save)  # run.v1.safetensors -> run.v1.ckpt (with_suffix would drop ".v1")
        checkpoint = save.with_name(save.name.removesuffix(".safetensors") + ".ckpt")
    if checkpoint is None and args.resume is not None:  # a resumed run goes on writing to the file it resumed from
        checkpoint = args.resume
    recipe = importlib.import_module(f"companion.recipes.{args.what}")
    try:
        with distributed.process_group():  # under torchrun: data-parallel training, one result line from rank 0
            getattr(recipe, f"train_{args.what}")(
                quick=quick_mode,
                epochs=args.epochs,
                root=args.data,
                seed=args.seed,
                save=args.save,
                overwrite=args.overwrite,
                checkpoint=checkpoint,
                resume_from=args.resume,
            )
    except TrainingInterrupted as stop:
        return stop.exit_code  # what was trained is saved; the message said where
    except KeyboardInterrupt:  # Ctrl-C before training started, or while the finished run was saving (it saved)
        print("python -m companion train: interrupted", file=sys.stderr)
        return 130
    except (OSError, DataError, ResumeError) as err:  # paths, files, the data copy, a checkpoint: said in one line
        print(f"python -m companion train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
