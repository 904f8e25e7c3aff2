"""``pergrad train``: train on an embedded dataset, with per-example statistics at every step."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..train.checkpoint import CheckpointError
from ..train.config import DATASETS, MODELS, OPTIMIZERS, ORDERS, ConfigError, TrainConfig

_HELP = {
    "model": f"model: {', '.join(MODELS)}",
    "dataset": f"dataset: {', '.join(DATASETS)}",
    "optimizer": f"optimizer: {', '.join(OPTIMIZERS)}",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "batch_size": "examples per step (at least 2)",
    "epochs": "passes over the training set",
    "seed": "seed of the split, the initial weights and the batch order",
    "out": "run directory (config, metrics, checkpoint, report)",
    "log_every": "steps between logged rows of statistics",
    "order": "batch order: shuffled (default) or sorted by label (a broken sampler, for demonstration)",
    "val_fraction": "share of the data held out for validation",
    "noise_beta": "smoothing of the noise-scale averages (EMA factor)",
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
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and one flag per TrainConfig field (read back by :func:`config_from_args`)."""
    defaults = TrainConfig()
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"str": str, "int": int, "float": float}[f.type]
        parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                            help=f"{_HELP[f.name]} (default: {getattr(defaults, f.name)})")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the TOML file, then the flags."""
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return base.replace(**given)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train
    from ..report import ReportError, build_report

    try:
        if args.resume:
            given = [f.name for f in fields(TrainConfig) if getattr(args, f.name) is not None]
            if given or args.config:
                raise ConfigError("--resume continues a run with its saved config; drop the other settings")
            config = TrainConfig.load(f"{args.resume}/config.toml").replace(out=args.resume)
        else:
            config = config_from_args(args)
        result = train(config, resume=bool(args.resume), quiet=args.quiet)
        report = build_report(result.run_dir)
    except (ConfigError, CheckpointError, ReportError) as err:
        print(f"pergrad train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pergrad train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    last = result.rows[-1] if result.rows else {}
    summary = f"loss {last.get('loss', float('nan')):.4f}"
    if last.get("val_accuracy") is not None:
        summary += f", validation accuracy {last['val_accuracy']:.3f}"
    print(f"trained {result.step} steps: {summary}")
    print(f"report: {report}")
    return 0
