"""``pergrad train``: train on an embedded dataset, with per-example statistics at every step."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from ..train.checkpoint import CheckpointError
from ..train.config import DATASETS, MODELS, OPTIMIZERS, ConfigError, TrainConfig
from ..train.metrics import Column

_HELP = {
    "model": f"model: {', '.join(MODELS)}",
    "dataset": f"dataset: {', '.join(DATASETS)}",
    "optimizer": f"optimizer: {', '.join(OPTIMIZERS)}",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "batch_size": "examples per step (at least 2), or 'auto': start at --min-batch-size and follow the "
    "noise scale B_simple up to --max-batch-size, with --lr (the rate at the min) scaled linearly for SGD, "
    "as the square root for Adam",
    "epochs": "passes over the training set",
    "seed": "seed of the initial weights and the batch order (and of the data, unless --data-seed)",
    "out": "run directory (config, metrics, checkpoint, report)",
    "log_every": "steps between logged rows of statistics",
    "order": "batch order: shuffled (default) or sorted by label (a broken sampler, for demonstration)",
    "val_fraction": "share of the data held out for validation",
    "noise_beta": "smoothing of the noise-scale and SNR averages, in (0, 1] (EMA factor; 1: plain averages)",
    "accumulate": "micro-batches per worker and step (gradient accumulation), of "
    "batch-size / (nproc x accumulate) examples each (with auto: at --max-batch-size, fewer below it)",
    "data_seed": "seed of the synthetic data and the training/validation split; -1: the same as --seed",
    "min_batch_size": "with --batch-size auto: the first and smallest batch size",
    "max_batch_size": "with --batch-size auto: the largest batch size",
    "measure_every": "per-example statistics on one optimizer step in K (steps 1, K+1, 2K+1, ...), the others "
    "paused at about a plain step's cost; --noise-beta applies per measured step",
    "shard": "none, or fsdp: shard parameters, gradients and optimizer state over the workers (FSDP2), "
    "checkpoints saved with torch.distributed.checkpoint (--fsdp for short)",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a small model and write a report of what its mini-batches average",
        description="Train on an embedded dataset (default: scikit-learn's digits, an MLP, SGD with "
        "momentum, batch size 32). Every step goes through pergrad.PerExample; the run directory "
        "gets config.toml, metrics.csv, checkpoint.pt and report.html.",
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files into the run directory: every metrics.csv "
                        "column as a scalar, and a histogram of the per-example gradient norms")  # fmt: skip
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel workers on this machine, started with torchrun (default: 1); "
                        "gloo on CPU, NCCL on GPU. For several machines run "
                        "'torchrun --nproc_per_node N ... -m pergrad train ...' on each instead")  # fmt: skip
    parser.add_argument("--fsdp", dest="shard", action="store_const", const="fsdp",
                        help="the same as --shard fsdp")  # fmt: skip
    parser.add_argument("--max-restarts", type=int, default=0, metavar="R",
                        help="run under torchrun and restart all workers up to R times when one fails; "
                        "they resume from the last checkpoint (default: 0)")  # fmt: skip
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and one flag per TrainConfig field (read back by :func:`config_from_args`)."""
    defaults = TrainConfig()
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"str": str, "int": int, "int | str": _batch_size, "float": float}[f.type]
        parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                            help=f"{_HELP[f.name]} (default: {getattr(defaults, f.name)})")  # fmt: skip


def _batch_size(text: str) -> int | str:
    """--batch-size: a whole number or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the TOML file, then the flags.

    Raises:
        ConfigError: bad settings, or bounds of the batch size given without ``--batch-size auto``.
    """
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = base.replace(**given)
    bounds = [f"--{k.replace('_', '-')}" for k in ("min_batch_size", "max_batch_size") if k in given]
    if bounds and not config.auto:
        flags = " and ".join(bounds)
        raise ConfigError(f"{flags} only bound --batch-size auto: add --batch-size auto, or drop {flags}")
    return config


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1 or args.max_restarts < 0:
        print("pergrad train: error: --nproc must be at least 1 and --max-restarts at least 0", file=sys.stderr)
        return 2
    if (args.nproc > 1 or args.max_restarts > 0 or _sharded(args)) and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _launch(args)
    if "WORLD_SIZE" in os.environ:  # a worker started by torchrun
        return _run_worker(args)
    return _train_and_report(args, rank=0)


def _sharded(args: argparse.Namespace) -> bool:
    """Whether the run shards its model (--fsdp, or a resumed --fsdp run): FSDP2 needs a process
    group, so it runs under torchrun even with one worker."""
    try:
        return _run_config(args).shard == "fsdp"
    except ConfigError:
        return False  # reported by the run itself


def _launch(args: argparse.Namespace) -> int:
    """Start ``args.nproc`` workers on this machine through torchrun, with elastic restarts;
    return torchrun's exit code (2, before starting anything, for settings that cannot run)."""
    try:
        _run_config(args).check_split(args.nproc)
    except ConfigError as err:
        print(f"pergrad train: error: {err}", file=sys.stderr)
        return 2
    forwarded = [f"--{f.name.replace('_', '-')}={getattr(args, f.name)}" for f in fields(TrainConfig)
                 if getattr(args, f.name) is not None]  # fmt: skip
    for flag in ("config", "resume"):
        if getattr(args, flag):
            forwarded.append(f"--{flag}={getattr(args, flag)}")
    for flag in ("quiet", "tensorboard"):
        if getattr(args, flag):
            forwarded.append(f"--{flag}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}", "-m", "pergrad", "train", *forwarded,
    ]  # fmt: skip
    # torchrun shares its rendezvous TCPStore with the workers by default, and a restarted attempt
    # can then read the dead attempt's gloo/NCCL addresses and hang or fail to connect (PyTorch
    # issue 135712); a store of its own per attempt makes --max-restarts work.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.call(command, env=env)


def _run_worker(args: argparse.Namespace) -> int:
    """One torchrun worker: join the process group, train, and leave it."""
    import torch.distributed as dist

    from ..distributed import init_from_env, shutdown

    init_from_env()
    try:
        return _train_and_report(args, rank=dist.get_rank())
    finally:
        shutdown()


def _run_config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: the saved config of ``--resume RUN_DIR``, else defaults, file and flags.

    Raises:
        ConfigError: settings given beside ``--resume``, or bad or missing ones.
    """
    if not args.resume:
        return config_from_args(args)
    given = [f.name for f in fields(TrainConfig) if getattr(args, f.name) is not None]
    if given or args.config:
        raise ConfigError("--resume continues a run with its saved config; drop the other settings")
    return TrainConfig.load(f"{args.resume}/config.toml").replace(out=args.resume)


def _train_and_report(args: argparse.Namespace, rank: int) -> int:
    from ..report import ReportError, build_report
    from ..train.loop import train

    try:
        config = _run_config(args)
        # torchrun's elastic restart after a failure: continue from the last checkpoint
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        resume = bool(args.resume) or (restarted and (Path(config.out) / "checkpoint.pt").is_file())
        result = train(config, resume=resume, quiet=args.quiet, tensorboard=args.tensorboard)
        if rank != 0:
            return 0
        report = build_report(result.run_dir)
    except (ConfigError, CheckpointError, ReportError) as err:
        print(f"pergrad train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pergrad train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    last = result.rows[-1] if result.rows else {}
    summary = f"loss {last.get(Column.LOSS, float('nan')):.4f}"
    if last.get(Column.VAL_ACCURACY) is not None:
        summary += f", validation accuracy {last[Column.VAL_ACCURACY]:.3f}"
    print(f"trained {result.step} steps: {summary}")
    print(f"report: {report}")
    return 0
