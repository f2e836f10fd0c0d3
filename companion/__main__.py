"""Command line: ``python -m companion bench conv``, ``python -m companion train cnn`` ...

``torchrun --nproc_per_node N -m companion train cnn`` trains data-parallel in N processes (one per GPU).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from companion import distributed, exercises
from companion.runtime import quick


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen benchmark or training recipe."""
    parser = argparse.ArgumentParser(prog="python -m companion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="print speed figures (benchmarks, not tests)")
    bench.add_argument("what", choices=["conv", "attention", "text"])
    bench.add_argument(
        "--device", default=None, help="cpu, cuda or mps (default: the best available; cpu for the text encoder)"
    )

    train = sub.add_parser("train", help="train a model with the book's recipe and report accuracy")
    train.add_argument("what", choices=["cnn", "vit", "llm"])
    train.add_argument("--quick", action="store_true", help="small subset and few epochs (also COMPANION_QUICK=1)")
    train.add_argument("--epochs", type=positive_int, default=None, help="override the recipe's number of epochs")
    train.add_argument("--data", default=None, help="data root (default: $COMPANION_DATA or the user cache)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--save", default=None, help="write the trained weights to this .safetensors file (its folder must exist)"
    )

    exercises.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "exercises":
        return exercises.main(args)
    if args.command == "bench":
        from companion import bench as benchmarks

        if args.device is not None:
            try:
                benchmarks.check_device(args.device)  # before any model or data loads
            except RuntimeError as err:
                parser.error(str(err))
        getattr(benchmarks, f"bench_{args.what}")(device=args.device)
    else:
        from companion.recipes.common import weights_path

        if args.save is not None:
            try:
                args.save = weights_path(args.save)  # before any data loads or training starts
            except OSError as err:
                parser.error(str(err))
        recipe = importlib.import_module(f"companion.recipes.{args.what}")
        with distributed.process_group():  # under torchrun: data-parallel training, one result line from rank 0
            getattr(recipe, f"train_{args.what}")(
                quick=args.quick or quick(), epochs=args.epochs, root=args.data, seed=args.seed, save=args.save
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
