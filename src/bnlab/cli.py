"""The ``bnlab`` command: one entry point for data, benchmarks, training and experiments.

Why: users of a teaching lab want one command per question ("is my data right?",
"is the scratch BN as fast as torch's?", "reproduce the chapter"). Each sub-command
is a thin shell over a library function; heavy imports happen only when a command runs,
so ``bnlab --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="find, fetch and verify Fashion-MNIST")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,info}")

    fetch = data_sub.add_parser(
        "fetch", help="make Fashion-MNIST available (no-op when already found and verified)")
    fetch.add_argument("--data-dir", help="where to look first and where to download to")
    fetch.set_defaults(handler=_run_data_fetch)

    info = data_sub.add_parser("info", help="where the data was found, verification, sizes, classes")
    info.add_argument("--data-dir", help="look here first")
    info.set_defaults(handler=_run_data_info)


def _run_data_fetch(args: argparse.Namespace) -> None:
    from bnlab import data

    root = data.fetch_fashion_mnist(args.data_dir)
    print(f"Fashion-MNIST ready at {root}")


def _run_data_info(args: argparse.Namespace) -> None:
    from bnlab import data

    print(data.dataset_info(args.data_dir))


def _add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks (ratios measured side by side)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{bn,loader}")

    loader = bench_sub.add_parser(
        "loader", help="bnlab's in-memory loader vs a per-sample torch DataLoader, one epoch")
    loader.add_argument("--data-dir", help="look here first for Fashion-MNIST")
    loader.add_argument("--batch-size", type=int, default=128)
    loader.add_argument("--repeats", type=int, default=3, help="epochs timed per loader")
    loader.set_defaults(handler=_run_bench_loader)

    bn = bench_sub.add_parser(
        "bn", help="bnlab's fast and reference batch norm vs torch's native kernel")
    bn.add_argument("--repeats", type=int, default=30, help="interleaved repeats per shape")
    bn.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bn.set_defaults(handler=_run_bench_bn)


def _run_bench_loader(args: argparse.Namespace) -> None:
    from bnlab.bench import loader

    print(loader.run_loader_benchmark(args.data_dir, args.batch_size, args.repeats))


def _run_bench_bn(args: argparse.Namespace) -> None:
    from bnlab.bench import bn

    print(bn.run_bn_benchmark(repeats=args.repeats, device=args.device))


COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data_commands,
    _add_bench_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="A laboratory for batch normalization (D2L's chapter, reproduced).",
    )
    from bnlab import __version__

    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_group in COMMAND_GROUPS:
        add_group(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bnlab.errors import BnlabError

    try:
        code = args.handler(args)
    except BnlabError as exc:
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
