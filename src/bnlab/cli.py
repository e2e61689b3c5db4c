"""The ``bnlab`` command: one entry point for data, benchmarks, training and experiments.

Why: users of a teaching lab want one command per question ("is my data right?",
"is the scratch BN as fast as torch's?", "reproduce the chapter"). Each sub-command
is a thin shell over a library function; flags of runs and experiments are derived from
their config dataclasses, so the CLI and the configs cannot drift apart.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bnlab.util.errors import BnlabError, describe_os_error
from bnlab.util.stopping import say_stopped, stop_on_signals

Handler = Callable[[argparse.Namespace], int | None]

DATA_DIR_DEFAULT = ("(default: $BNLAB_DATA, else ~/.cache/bnlab/fashion-mnist, then "
                    "/usr/share/datasets/fashion-mnist)")

DEFAULT_REPORT_RUNS = ("runs/demo", "runs/exp")
DEFAULT_SITE_RUNS = "runs/exp"


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="find, fetch and verify Fashion-MNIST")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,info}")

    fetch = data_sub.add_parser(
        "fetch", help="make Fashion-MNIST available (no-op when already found and verified)")
    fetch.add_argument("--data-dir", help="where to look first and where to download to "
                       + DATA_DIR_DEFAULT)
    fetch.set_defaults(handler=_run_data_fetch)

    info = data_sub.add_parser("info", help="where the data was found, verification, sizes, classes")
    info.add_argument("--data-dir", help="look here first " + DATA_DIR_DEFAULT)
    info.set_defaults(handler=_run_data_info)


def _run_data_fetch(args: argparse.Namespace) -> None:
    from bnlab.data.fetch import fetch_fashion_mnist

    root = fetch_fashion_mnist(args.data_dir)
    print(f"Fashion-MNIST ready at {root}")


def _run_data_info(args: argparse.Namespace) -> None:
    from bnlab.data.dataset import dataset_info

    print(dataset_info(args.data_dir))


def _add_kernel_commands(sub: argparse._SubParsersAction) -> None:
    kernel = sub.add_parser("kernel", help="build or inspect bnlab's C++ batch-norm kernel "
                            "(impl='auto' uses it once built)")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", required=True,
                                       metavar="{build,info}")
    build = kernel_sub.add_parser(
        "build", help="compile the kernel once for this machine and torch (needs a C++ "
                      "compiler and ninja); a no-op when built")
    build.set_defaults(handler=_run_kernel_build)
    info = kernel_sub.add_parser(
        "info", help="where the kernel is cached, whether it loads, what a build needs")
    info.set_defaults(handler=_run_kernel_info)


def _run_kernel_build(args: argparse.Namespace) -> None:
    from bnlab.kernels import cpp as _cpp

    try:
        _cpp.build_extension()
    except _cpp.KernelUnavailable as exc:
        raise BnlabError(f"{exc}; impl='auto' uses the fast path without it") from None
    print(f"bnlab's C++ kernel is built: {_cpp.kernel_build().library}")


def _run_kernel_info(args: argparse.Namespace) -> None:
    from bnlab.kernels import cpp as _cpp

    info = _cpp.kernel_info()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key + ':':<{width + 1}} {value}")


def _add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks (ratios measured side by side)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True,
                                     metavar="{bn,fold,grid,loader,step}")

    loader = bench_sub.add_parser(
        "loader", help="bnlab's in-memory loader vs a per-sample torch DataLoader, one epoch")
    _add_data_dir_flag(loader)
    loader.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    loader.add_argument("--repeats", type=int, default=3, help="epochs timed per loader (default: 3)")
    loader.set_defaults(handler=_run_bench_loader)

    from bnlab.bench.bn import DEFAULT_IMPLS
    from bnlab.functional import IMPLEMENTATIONS

    bn = bench_sub.add_parser(
        "bn", help="bnlab's batch norm implementations vs torch's native kernel")
    bn.add_argument("--repeats", type=int, default=100,
                    help="interleaved repeats per shape (default: 100)")
    bn.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                    help="comma-separated implementations from "
                         f"{', '.join(IMPLEMENTATIONS)}; cpp builds bnlab's kernel first if "
                         "needed, compiled compiles each shape first (both excluded from the "
                         f"timings) (default: {','.join(DEFAULT_IMPLS)})")
    bn.add_argument("--floor", action="store_true",
                    help="also time a do-nothing Python autograd.Function: the overhead any "
                         "plain-tensor-op implementation pays before its math (default: off)")
    _add_device_flag(bn)
    bn.add_argument("--acts", default="relu,sigmoid",
                    help="activations of the batch norm + activation table (bnlab.nn.BatchNormAct "
                         "fused, the same unfused, torch eager and torch.compile, module level); "
                         "'none' leaves it out (default: relu,sigmoid)")
    bn.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                    help="time torch.compile of torch's batch norm + activation too (compiles "
                         "each shape first, excluded from the timings; default: on)")
    _add_write_docs_flag(bn)
    bn.set_defaults(handler=_run_bench_bn)

    step = bench_sub.add_parser(
        "step", help="BN-LeNet training steps with each norm, stepped in turn on the same "
                     "Fashion-MNIST batches")
    step.add_argument("--norms", default="bnlab,torch",
                      help="comma-separated norm names (see `bnlab train --help`), e.g. "
                           "bnlab,bnlab-fast,torch; ratios are to torch's (default: bnlab,torch)")
    step.add_argument("--steps", type=int, default=300, help="timed steps per norm (default: 300)")
    step.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    _add_data_dir_flag(step)
    _add_device_flag(step)
    step.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                      help="also step torch.compile'd torch BN-LeNet (same weights and batches; "
                           "its compilation is reported apart; default: on)")
    _add_write_docs_flag(step)
    step.set_defaults(handler=_run_bench_step)

    fold = bench_sub.add_parser(
        "fold", help="BN-LeNet eval latency at batch 1 and 128: unfolded, folded "
                     "(bnlab.nn.fold) and torch's conv-BN fusion, interleaved")
    fold.add_argument("--repeats", type=int, default=200,
                      help="interleaved calls per model (default: 200)")
    _add_device_flag(fold)
    fold.set_defaults(handler=_run_bench_fold)
    grid = bench_sub.add_parser(
        "grid", help="a small grid's wall time: local process pool vs Ray (overhead per task)")
    grid.add_argument("--seeds", type=int, default=2,
                      help="seeds of the 3-variant chapter grid (default: 2)")
    grid.add_argument("--workers", type=int, default=2,
                      help="runs at a time, 1 thread each (default: 2)")
    grid.add_argument("--repeats", type=int, default=2,
                      help="rounds, executors alternating (default: 2)")
    _add_data_dir_flag(grid)
    grid.set_defaults(handler=_run_bench_grid)


def _add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="look here first for Fashion-MNIST " + DATA_DIR_DEFAULT)


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else the CPU (default: auto)")


def _add_write_docs_flag(parser: argparse.ArgumentParser) -> None:
    from bnlab.bench.docs import DEFAULT_PATH

    parser.add_argument("--write-docs", nargs="?", const=str(DEFAULT_PATH), default=None,
                        metavar="PATH", help="also write the table, with machine, torch "
                        f"version and date, into its section of PATH (default: off; PATH "
                        f"defaults to {DEFAULT_PATH})")


def _publish(args: argparse.Namespace, key: str, title: str, table: str) -> None:
    print(table)
    if args.write_docs:
        from bnlab.bench.docs import write_section

        command = "bnlab " + " ".join(shlex.quote(a) for a in args.argv)
        path = write_section(key, title, command, table, args.write_docs)
        print(f"wrote {path}")


def _load_data(args: argparse.Namespace):
    """Fashion-MNIST as ``--data-dir`` (or the search path) finds it; says where it came from."""
    from bnlab.data.dataset import load_fashion_mnist

    data = load_fashion_mnist(args.data_dir)
    print(f"data: Fashion-MNIST from {data.root} (via {data.found_via})")
    return data


def _run_bench_loader(args: argparse.Namespace) -> None:
    from bnlab.bench import loader

    _check_positive(args, "batch_size", "repeats")
    print(loader.run_loader_benchmark(args.data_dir, args.batch_size, args.repeats))


def _run_bench_step(args: argparse.Namespace) -> None:
    import torch

    from bnlab.bench import step
    from bnlab.training.norms import check_norm_name
    from bnlab.training.train import (
        TrainConfig,
        build_loaders,
        make_step,
        model_for,
        optimizer_for,
        resolve_device,
        seeded_steps,
    )

    _check_positive(args, "steps")
    norms = tuple(n.strip() for n in args.norms.split(",") if n.strip())
    if "torch" not in norms:
        raise BnlabError(f"--norms: expected torch among the norms, the ratios' reference "
                         f"(got {args.norms!r})")
    for name in norms:
        try:
            check_norm_name(name)
        except ValueError as exc:
            raise BnlabError(f"--norms: {exc}") from None
    device, lr = resolve_device(args.device), 0.1
    # Training batches only: no validation split is held out (nothing is evaluated).
    configs = {n: TrainConfig(model="bn-lenet", norm=n, lr=lr, batch_size=args.batch_size, seed=0,
                              val_size=0) for n in norms}
    batches = build_loaders(configs["torch"], _load_data(args), device).train
    step_fns = seeded_steps(configs, device)
    compiled: tuple[str, ...] = ()
    if args.compiled:  # torch's model with the same seeded weights, compiled on its first step
        torch.manual_seed(configs["torch"].seed)
        model = model_for(configs["torch"], device).train()
        compiled = ("torch.compile",)
        step_fns["torch.compile"] = make_step(torch.compile(model, dynamic=False),
                                              optimizer_for(model, configs["torch"]))
    table = step.run_step_benchmark(step_fns, batches, steps=args.steps,
                                    setup=f"SGD lr {lr}, batch {args.batch_size}", device=device,
                                    compiled=compiled)
    _publish(args, "step", "BN-LeNet training step (`bench step`)", table)


def _run_bench_fold(args: argparse.Namespace) -> None:
    from bnlab.bench import fold
    from bnlab.training.train import resolve_device

    _check_positive(args, "repeats")
    resolve_device(args.device)  # --device cuda without CUDA: one line, before any work
    print(fold.run_fold_benchmark(repeats=args.repeats, device=args.device))


def _run_bench_grid(args: argparse.Namespace) -> None:
    from bnlab.bench.grid import run_grid_benchmark

    _check_positive(args, "seeds", "workers", "repeats")
    print(run_grid_benchmark(_load_data(args), args.seeds, args.workers, args.repeats))


def _run_bench_bn(args: argparse.Namespace) -> None:
    from bnlab.bench import bn, bn_act
    from bnlab.functional import IMPLEMENTATIONS
    from bnlab.kernels import cpp as _cpp
    from bnlab.training.train import resolve_device

    _check_positive(args, "repeats")
    resolve_device(args.device)  # --device cuda without CUDA: one line, before any work
    impls = tuple(n.strip() for n in args.impls.split(",") if n.strip())
    unknown = [n for n in impls if n not in IMPLEMENTATIONS]
    if unknown or not impls:
        raise BnlabError(f"--impls: expected names from {', '.join(IMPLEMENTATIONS)} "
                         f"(got {args.impls!r})")
    acts = () if args.acts == "none" else tuple(a.strip() for a in args.acts.split(",") if a.strip())
    if not set(acts) <= set(bn_act.ACTIVATIONS):
        raise BnlabError(f"--acts: expected names from {', '.join(bn_act.ACTIVATIONS)}, or none "
                         f"(got {args.acts!r})")
    try:
        table = bn.run_bn_benchmark(repeats=args.repeats, device=args.device, impls=impls,
                                    floor=args.floor)
        if acts:
            table += "\n\n" + bn_act.run_bn_act_benchmark(
                repeats=args.repeats, device=bn.resolve_device(args.device), activations=acts,
                compile=args.compiled)
    except _cpp.KernelUnavailable as exc:
        raise BnlabError(str(exc)) from None
    _publish(args, "bn", "Batch norm, alone and with its activation (`bench bn`)", table)


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    from bnlab.experiments.demo import DemoConfig
    from bnlab.training.distributed import DistributedConfig
    from bnlab.training.train import TrainConfig
    from bnlab.util.config import add_config_flags

    train = sub.add_parser("train", help="train one model on Fashion-MNIST (one run folder)",
                           description="Train one model; writes config.json, metrics.jsonl, "
                           "steps.jsonl, summary.json, curves.png and checkpoint.pt to --out.")
    add_config_flags(train, TrainConfig)
    add_config_flags(train, DistributedConfig)
    train.add_argument("--out", help="run folder (default: runs/<model>-<norm>-lr<lr>-seed<seed>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (default: off: a folder with a finished "
                            "epoch is refused)")
    train.add_argument("--tensorboard", metavar="DIR",
                       help="also log losses, accuracies and BN histograms to TensorBoard in DIR "
                            "(default: no logging)")
    _add_common_run_flags(train)
    train.set_defaults(handler=_run_train)

    inspect = sub.add_parser("inspect", help="gamma/beta and running stats of a run's norm layers")
    inspect.add_argument("run", help="a run folder (from bnlab train or bnlab demo)")
    inspect.add_argument("--no-figure", dest="figure", action="store_false",
                         help="do not write norm_params.png (default: write it into the run)")
    inspect.set_defaults(handler=_run_inspect)

    demo = sub.add_parser("demo", help="the chapter's demo: LeNet vs BN-LeNet (bnlab, torch)",
                          description="Train plain LeNet, BN-LeNet with bnlab's BN and BN-LeNet "
                          "with torch's BN, epochs interleaved; print a table and write "
                          "report.md and figures to --out. Finished runs are reused.")
    add_config_flags(demo, DemoConfig)
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--fresh", action="store_true",
                      help="delete the demo's earlier runs in --out and start over (default: "
                           "off: finished runs are reused, cut-off ones resumed)")
    _add_common_run_flags(demo)
    demo.set_defaults(handler=_run_demo)


def _add_common_run_flags(parser: argparse.ArgumentParser) -> None:
    _add_data_dir_flag(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars or per-epoch lines (default: shown)")


def _config_or_error(cls, args, base=None):
    from bnlab.util.config import config_from_args

    return config_from_args(cls, args, base)  # a bad value is a ConfigError, a BnlabError


def _run_train(args: argparse.Namespace) -> None:
    from bnlab.training.distributed import (
        DistributedConfig,
        check_resumed_alone,
        launched_by_torchrun,
        train_distributed,
    )
    from bnlab.training.models import has_norm_layers
    from bnlab.training.train import TrainConfig, describe, start_run
    from bnlab.util.tables import counted

    if args.norm is None and not has_norm_layers(args.model):
        args.norm = "none"
    config = _config_or_error(TrainConfig, args)
    out = args.out or f"runs/{config.model}-{config.norm}-lr{config.lr:g}-seed{config.seed}"
    world = _config_or_error(DistributedConfig, args)
    if world.nproc > 1 or launched_by_torchrun():
        if args.tensorboard:
            raise BnlabError("--tensorboard logs one process's run; it does not go with --nproc > 1")
        print(f"training {describe(config)} on {counted(world.nproc, 'process', 'processes')} "
              f"-> {out}")
        summary = train_distributed(config, world, _load_data(args), out, args.resume,
                                    args.progress)
        if summary is None:  # a rank other than 0 under torchrun
            return
    else:
        from bnlab.training.tensorboard import optional_logger

        check_resumed_alone(out, args.resume)
        print(f"training {describe(config)} -> {out}")
        with optional_logger(args.tensorboard) as observer:
            summary = start_run(config, _load_data(args), out, args.resume,
                                args.progress, observer=observer).train()
    print(f"{describe_outcome(summary)}; results in {out}")


def describe_outcome(summary: dict) -> str:
    """A finished or diverged run's summary in one line, numbers rounded for reading."""
    if summary["diverged"]:
        at, done = summary["diverged_at"], summary["epochs_completed"]
        return (f"diverged at epoch {at['epoch']}, step {at['step']} (loss not finite), after "
                f"{done} finished epoch{'' if done == 1 else 's'}")
    return (f"finished: final val acc {summary['final_val_acc']:.4f}, best "
            f"{summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), "
            f"{summary['median_seconds_per_epoch']:.2f} s/epoch (median)")


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """BnlabError unless each named integer flag is at least 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise BnlabError(f"expected --{name.replace('_', '-')} >= 1 (got {value})")


def _run_inspect(args: argparse.Namespace) -> None:
    from bnlab.training.inspection import PARAMS_FIGURE, inspect_run, write_norm_figure

    print(inspect_run(args.run, figure=False), flush=True)  # the numbers first, whatever follows
    if not args.figure:
        return
    try:
        path = write_norm_figure(args.run)
    except OSError as exc:
        print(f"bnlab: warning: could not write the figure {PARAMS_FIGURE}: "
              f"{describe_os_error(exc)}", file=sys.stderr)
        return
    if path is not None:
        print(f"\nfigure: {path}")


def _add_runs_commands(sub: argparse._SubParsersAction) -> None:
    run_folders = sub.add_parser("runs", help="maintain run folders")
    runs_sub = run_folders.add_subparsers(dest="runs_command", required=True, metavar="{upgrade}")
    upgrade = runs_sub.add_parser(
        "upgrade", help="rewrite checkpoints that do not load safely (tensors and plain "
                        "containers only) in the safe form; this TRUSTS them: each is unpickled "
                        "fully, which runs any code it holds",
        description="bnlab loads checkpoint.pt with torch.load(weights_only=True), which builds "
                    "nothing but tensors and plain containers, so a crafted file runs nothing. "
                    "A checkpoint that holds more is refused; if you trust it (an older bnlab "
                    "wrote it), this command unpickles it fully and rewrites it so that it "
                    "loads safely. Checkpoints that load safely are left alone.")
    upgrade.add_argument("dirs", nargs="+", metavar="DIR",
                         help="a run folder, or a folder with run folders below it")
    upgrade.set_defaults(handler=_run_runs_upgrade)


def _run_runs_upgrade(args: argparse.Namespace) -> None:
    from bnlab.training import runs
    from bnlab.training.train import CHECKPOINT_KEYS

    for root in map(Path, args.dirs):
        if not root.is_dir():
            raise BnlabError(f"{root}: no such folder")
        folders = runs.checkpoints_under(root)
        if not folders:
            raise BnlabError(f"{root}: no {runs.CHECKPOINT} in it or below it")
        for run_dir in folders:
            runs.upgrade_checkpoint(run_dir, CHECKPOINT_KEYS)


def _run_demo(args: argparse.Namespace) -> None:
    from bnlab.experiments.demo import DemoConfig, run_demo

    config = _config_or_error(DemoConfig, args)
    print(run_demo(config, args.out, _load_data(args), args.fresh,
                   args.progress))
    print(f"report: {args.out}/report.md")


def _add_experiment_commands(sub: argparse._SubParsersAction) -> None:
    from bnlab.experiments import EXPERIMENTS
    from bnlab.experiments.executors import EXECUTORS
    from bnlab.experiments.runner import ExpSettings
    from bnlab.util.config import add_config_flags

    listing = "; ".join(f"{name}: {e.title}" for name, e in EXPERIMENTS.items())
    exp = sub.add_parser(
        "exp", help="run an experiment (a grid of training runs) and write its report",
        description=f"Experiments: {listing}. Finished runs are skipped, cut-off runs resumed.")
    exp.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    add_config_flags(exp, ExpSettings, skip=("quick",))  # --quick below sets it
    size = exp.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smoke test: 1 seed, 1 epoch, 1000 training images (default: the "
                           "experiment's grid)")
    size.add_argument("--full", action="store_true",
                      help="the chapter's settings: 3 seeds, 10 epochs, all 60000 images "
                           "(default: the experiment's grid)")
    exp.add_argument("--dry-run", action="store_true",
                     help="print the grid (variants x seeds, finished runs, steps to train) and "
                          "an estimate of its training time from steps timed now; train and "
                          "write nothing (default: off)")
    exp.add_argument("--jobs", type=int, default=1,
                     help="runs in parallel processes; threads are split between them "
                          "(default: 1)")
    exp.add_argument("--out", default="runs/exp", help="output folder (default: runs/exp)")
    exp.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="where runs train: local processes (default) or Ray tasks")
    exp.add_argument("--address", help="--executor ray: 'auto' (the cluster on this machine) "
                     "or HOST:PORT of a head node (default: start a local Ray)")
    exp.add_argument("--threads", type=int, help="threads per run (default: local cpu_count "
                     "// jobs, ray 1); a Ray task reserves that many CPUs")
    exp.add_argument("--tensorboard", metavar="DIR",
                     help="also log each run trained to TensorBoard, in DIR/<run folder name> "
                          "(default: no logging)")
    _add_common_run_flags(exp)
    exp.set_defaults(handler=_run_experiment)

    lab = sub.add_parser(
        "lab", help="run every experiment (or the named ones) at its defaults, then write the site",
        description="Run every experiment (or the NAMEs) one after another into --out, as `bnlab "
                    "exp NAME` would: runs are shared by config hash, finished ones skipped and "
                    "cut-off ones resumed, so a second call only re-analyses. A failing experiment "
                    "is listed with its error and the others go on (the exit status says so). "
                    "Then it prints each experiment's wall time in this call and its cost (what "
                    "its runs, measurements and analysis recorded, over all calls), keeps them "
                    "in --out/lab.json and writes the site into --out/site "
                    "(`bnlab report --html`).")
    lab.add_argument("names", nargs="*", metavar="NAME",
                     help=f"experiments to run (default: all: {' '.join(EXPERIMENTS)})")
    lab_size = lab.add_mutually_exclusive_group()
    lab_size.add_argument("--quick", action="store_true",
                          help="every experiment's smoke test (as exp --quick) (default: each "
                               "experiment's own grid)")
    lab_size.add_argument("--full", action="store_true",
                          help="the chapter's settings for every experiment (as exp --full) "
                               "(default: each experiment's own grid)")
    lab.add_argument("--seeds", type=int,
                     help="seeds per variant (default: 3; --quick: 1)")
    lab.add_argument("--jobs", type=int, default=1,
                     help="runs in parallel processes, as for exp (default: 1)")
    lab.add_argument("--out", default="runs/exp", help="output folder (default: runs/exp)")
    lab.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="where runs train, as for exp (default: local)")
    lab.add_argument("--address", help="--executor ray: as for exp (default: start a local Ray)")
    lab.add_argument("--threads", type=int, help="threads per run, as for exp (default: local "
                     "cpu_count // jobs, ray 1)")
    _add_common_run_flags(lab)
    lab.set_defaults(handler=_run_lab)

    report = sub.add_parser(
        "report", help="gather the demo and all experiment reports into one (--html: a site)",
        description="Gather the demo's report.md and each experiment's report.md found under "
                    "the --runs folders into one Markdown file (--out), the experiments in "
                    "bnlab's order, figure links rewritten to work from there. With --html, "
                    "write a static site instead: an index of every claim with its verdict and "
                    "every experiment, and a page per experiment with its report and figures, "
                    "self-contained (it works from file:// and from a zip).")
    report.add_argument("--runs", nargs="+",
                        help=f"folders to gather from (default: {' '.join(DEFAULT_REPORT_RUNS)}; "
                             f"--html: {DEFAULT_SITE_RUNS})")
    report.add_argument("--html", action="store_true",
                        help="write the site, a folder, instead of one Markdown file (default: off)")
    report.add_argument("--out", help="(default: runs/report.md; --html: the first --runs "
                                      "folder's site/)")
    report.set_defaults(handler=_run_report)


def _run_experiment(args: argparse.Namespace) -> None:
    from bnlab.experiments import get_experiment, sizing
    from bnlab.experiments.executors import make_executor
    from bnlab.experiments.runner import FULL, QUICK, ExpSettings, check_data, run_experiment
    from bnlab.training.tensorboard import summary_writer_class

    base = QUICK if args.quick else FULL if args.full else None
    settings = _config_or_error(ExpSettings, args, base)
    _check_positive(args, "jobs")
    executor = make_executor(args.executor, args.jobs, args.address, args.threads)
    experiment = get_experiment(args.name)
    if args.dry_run:
        print(sizing.dry_run(experiment, settings, args.out, args.jobs, args.threads))
        if args.executor == "ray":
            print("With --executor ray the runs spread over the cluster's CPUs: the estimate "
                  "is for this machine, one run at a time.")
        return
    if args.tensorboard:
        summary_writer_class()  # fails now, naming the extra, when tensorboard is missing
    planned = sizing.planned_runs(experiment, settings, args.out)  # validates every config
    dataset = _load_data(args)
    check_data(planned, dataset)  # before the grid's size is said
    with sizing.grid_progress(planned, args.progress):
        print(run_experiment(experiment, settings, args.out, dataset,
                             args.jobs, args.progress, executor, args.tensorboard,
                             command=shlex.join(["bnlab", *args.argv])))
    print(f"report: {args.out}/{experiment.name}/report.md")


def _lab_exp_flags(args: argparse.Namespace) -> list[str]:
    """The flags of `bnlab exp` that repeat what this `bnlab lab` call was asked."""
    flags = ["--quick"] if args.quick else ["--full"] if args.full else []
    for flag, value, default in (("--seeds", args.seeds, None), ("--jobs", args.jobs, 1),
                                 ("--out", args.out, None), ("--executor", args.executor, "local"),
                                 ("--address", args.address, None),
                                 ("--threads", args.threads, None),
                                 ("--data-dir", args.data_dir, None)):
        if value != default:
            flags += [flag, str(value)]
    return flags


def _run_lab(args: argparse.Namespace) -> None:
    import dataclasses

    from bnlab.experiments import EXPERIMENTS, get_experiment
    from bnlab.experiments.executors import make_executor
    from bnlab.experiments.lab import run_lab, summary
    from bnlab.experiments.runner import FULL, QUICK, ExpSettings

    try:
        experiments = [get_experiment(n) for n in dict.fromkeys(args.names or EXPERIMENTS)]
    except ValueError as exc:
        raise BnlabError(str(exc)) from None
    settings = QUICK if args.quick else FULL if args.full else ExpSettings()
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=args.seeds)  # checked by ExpSettings
    _check_positive(args, "jobs")
    executor = make_executor(args.executor, args.jobs, args.address, args.threads)
    dataset = _load_data(args)
    flags = _lab_exp_flags(args)
    result = run_lab(experiments, settings, args.out, dataset,
                     lambda name: shlex.join(["bnlab", "exp", name, *flags]),
                     shlex.join(["bnlab", *args.argv]), args.jobs, executor, args.progress)
    print(summary(result, Path(args.out)))
    if result.failed:
        raise BnlabError(f"{len(result.failed)} of {len(result.outcomes)} experiments failed or "
                         f"left runs out: {', '.join(o.name for o in result.failed)} (see above)")
    if result.site is None:
        raise BnlabError(f"the site was not written: {result.site_error}")


def _run_report(args: argparse.Namespace) -> None:
    from bnlab.experiments import EXPERIMENTS
    from bnlab.experiments.report import build_report
    from bnlab.util.tables import counted

    if args.runs:  # folders named on the command line must exist; the defaults may not yet
        missing = [r for r in args.runs if not Path(r).is_dir()]
        if missing:
            raise BnlabError(f"--runs {' '.join(missing)}: no such folder")
    if args.html:
        from bnlab.experiments.site import build_site

        roots = args.runs or [DEFAULT_SITE_RUNS]
        site = build_site(roots, args.out or str(Path(roots[0]) / "site"))
        print(f"site: {site / 'index.html'}")
        return
    path, gathered = build_report(args.runs or list(DEFAULT_REPORT_RUNS),
                                  args.out or "runs/report.md", order=tuple(EXPERIMENTS))
    print(f"gathered {counted(len(gathered), 'report')} into {path}")


COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data_commands,
    _add_kernel_commands,
    _add_bench_commands,
    _add_train_commands,
    _add_runs_commands,
    _add_experiment_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Start here: `bnlab demo` trains the chapter's LeNet with and without batch "
                    "norm and writes runs/demo/report.md (`bnlab data info` first checks that "
                    "Fashion-MNIST is found). A laboratory for batch normalization (D2L's "
                    "chapter, reproduced): then `bnlab exp NAME --dry-run` sizes an experiment "
                    "and `bnlab exp NAME` runs it.",
    )
    from bnlab import __version__

    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_group in COMMAND_GROUPS:
        add_group(sub)
    _describe_commands(parser)
    return parser


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command without a description its one-line help as one, so that
    ``bnlab CMD --help`` says what CMD does, not only its flags."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for pages that record it
    try:
        with stop_on_signals():  # SIGTERM unwinds as Ctrl-C does; a second one exits at once
            code = args.handler(args)
    except BnlabError as exc:
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, the file system, permissions: one line, path and cause
        print(f"bnlab: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (stopping.Terminated)
        return say_stopped(exc)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
