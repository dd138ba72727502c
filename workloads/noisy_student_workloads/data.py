"""Command line for data sets: pack a source into shards, inspect shards.

``noisy-student data ...`` delegates here (:func:`main`).

Examples::

    python -m noisy_student_workloads.data pack --source mnist --labels-per-class 50 \
        --seed 0 --shard-size 1000 --output file:///tmp/mnist
    python -m noisy_student_workloads.data inspect 'file:///tmp/mnist/unlabeled-*.tar'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .datasets import SOURCES, pack_dataset
from .pipeline import count_samples
from .store import expand_shards

__all__ = ["build_parser", "main", "pack_dataset"]

log = logging.getLogger(__name__)


def build_parser(prog: str = "python -m noisy_student_workloads.data") -> argparse.ArgumentParser:
    """The ``pack`` / ``inspect`` argument parser (reused by the project CLI)."""
    parser = argparse.ArgumentParser(prog=prog, description="Pack and inspect image shard data sets.")
    sub = parser.add_subparsers(dest="command", required=True)

    pack = sub.add_parser("pack", help="pack a source into labeled / unlabeled / validation shards")
    pack.add_argument("--source", required=True, choices=SOURCES)
    pack.add_argument("--path", help="directory of fashion-mnist IDX files or of a <class>/<file> image tree")
    pack.add_argument("--labels-per-class", type=int, required=True, help="labeled images kept per class")
    pack.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    pack.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    pack.add_argument(
        "--validation-size",
        type=int,
        help="validation images (default: 20%% of the images; 10%% of the training images for a source with a "
        "test split, which becomes the test split)",
    )
    pack.add_argument("--no-test-split", dest="test_split", action="store_false",
                      help="a source's own test split is the validation split (no test split)")
    pack.add_argument("--output", required=True, help="output prefix URI (file://..., s3://... or a path)")

    inspect = sub.add_parser("inspect", help="count the samples of shards")
    inspect.add_argument("pattern", help="shard URIs: brace ranges {000000..000003} or * in the file name")
    inspect.add_argument("--output", choices=("text", "json"), default="text")
    return parser


def _print_counts(counts: dict[str, Any]) -> None:
    print(f"shards   {counts['shards']}")
    print(f"samples  {counts['samples']}")
    print(f"labeled  {counts['labeled']}")
    for cls, n in counts["per_class"].items():
        print(f"  class {cls:>4}  {n}")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the data CLI; returns the exit status (0 ok, 1 bad input or missing data)."""
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "pack":
            info = pack_dataset(
                args.source,
                args.output,
                labels_per_class=args.labels_per_class,
                seed=args.seed,
                shard_size=args.shard_size,
                path=args.path,
                validation_size=args.validation_size,
                test_split=args.test_split,
            )
            summary = {k: info[k] for k in ("source", "num_classes", "counts", "patterns")}
            print(json.dumps(summary, indent=2))
        else:
            counts = count_samples(expand_shards(args.pattern))
            if args.output == "json":
                print(json.dumps(counts, indent=2))
            else:
                _print_counts(counts)
    except (ValueError, OSError) as exc:
        # FileNotFoundError is an OSError; every message names the field or file.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
