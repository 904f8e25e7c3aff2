"""The typed configuration of a training run, from flags or a TOML file."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .._atomic import write_atomic
from ..stats.smoothing import check_beta, check_measure_every

__all__ = ["ConfigError", "TrainConfig", "MODELS", "DATASETS", "OPTIMIZERS", "ORDERS"]

MODELS = ("mlp", "cnn", "transformer", "linear")
DATASETS = ("digits", "linreg", "sequence")
OPTIMIZERS = ("sgd", "adam")
ORDERS = ("shuffled", "sorted")
SHARDS = ("none", "fsdp")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Defaults: digits, an MLP, SGD with momentum, B = 32.

    Attributes:
        model: "mlp", "cnn", "transformer" or "linear".
        dataset: "digits" (scikit-learn's 1797 8×8 images), "linreg" (synthetic linear
            regression with known noise) or "sequence" (synthetic: predict the previous token).
        optimizer: "sgd" (with ``momentum``) or "adam".
        lr: learning rate, > 0.
        momentum: SGD momentum in [0, 1).
        batch_size: B, examples per optimizer step over all workers and micro-batches, ≥ 2
            (a variance needs two). Each of W workers runs ``accumulate`` micro-batches of
            B / (W · accumulate) examples. Or "auto": B starts at ``min_batch_size`` and follows
            the noise scale B_simple up to ``max_batch_size``
            (:class:`~pergrad.stats.AdaptiveBatchSize`), and ``lr`` (the rate at
            ``min_batch_size``) scales with it, linearly for SGD and as √B for Adam.
        min_batch_size, max_batch_size: the bounds of an ``auto`` batch size, 2 ≤ min ≤ max.
        epochs: passes over the training set, ≥ 1.
        seed: seeds the initial weights and the batch order, and the data unless
            ``data_seed`` is set.
        out: the run directory.
        log_every: steps between logged rows of statistics, ≥ 1.
        order: "shuffled" (a fresh permutation each epoch) or "sorted" (by label: a
            deliberately broken sampler, for the demonstration of the sampling check).
        val_fraction: share of the data held out for validation, in (0, 0.5].
        noise_beta: smoothing of the noise-scale EMAs, in [0, 1).
        accumulate: K, micro-batches per worker and step (gradient accumulation), ≥ 1; their
            gradients average to the gradient of the whole batch. With ``auto``, K micro-batches
            at ``max_batch_size`` and fewer below it (:meth:`micro_batches_per_worker`): a worker never holds
            more than max_batch_size / (W · K) examples at once.
        shard: "none" (data-parallel workers each hold the whole model, DistributedDataParallel) or
            "fsdp" (its parameters, gradients and optimizer state sharded over the workers with FSDP2's
            ``fully_shard``, checkpoints saved with ``torch.distributed.checkpoint``).
        data_seed: seeds the synthetic datasets and the training/validation split; -1 (the
            default): ``seed``. Runs that share it and differ in ``seed`` see the same data.
        measure_every: k ≥ 1: per-example statistics on optimizer steps 0, k, 2k, … only; the
            others run inside :meth:`DistributedPerExample.paused <pergrad.DistributedPerExample.paused>`
            (no capture, no check: about a plain step's cost). ``noise_beta`` applies per measured
            step; a metrics row with no measured step since the previous row has the loss and
            empty statistics; ``auto`` changes B only after a measured step.
    """

    model: str = "mlp"
    dataset: str = "digits"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int | str = 32
    epochs: int = 12
    seed: int = 0
    out: str = "runs/latest"
    log_every: int = 5
    order: str = "shuffled"
    val_fraction: float = 0.2
    noise_beta: float = 0.95
    accumulate: int = 1
    data_seed: int = -1
    min_batch_size: int = 16
    max_batch_size: int = 128
    shard: str = "none"
    measure_every: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what to use instead."""
        for name, allowed in (("model", MODELS), ("dataset", DATASETS), ("optimizer", OPTIMIZERS), ("order", ORDERS),
                              ("shard", SHARDS)):  # fmt: skip
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        if self.auto:
            _check(
                self.min_batch_size >= 2,
                f"min_batch_size must be at least 2 (a variance needs two examples), got {self.min_batch_size}",
            )
            _check(
                self.max_batch_size >= self.min_batch_size,
                f"max_batch_size {self.max_batch_size} is below min_batch_size {self.min_batch_size}: "
                "give --max-batch-size at least --min-batch-size",
            )
        else:
            _check(
                isinstance(self.batch_size, int),
                f"batch_size must be a whole number or 'auto', got {self.batch_size!r}",
            )
            _check(
                self.batch_size >= 2,
                f"batch_size must be at least 2 (a variance needs two examples), got {self.batch_size}",
            )
        _check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _check(self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}")
        _check(0 < self.val_fraction <= 0.5, f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        _check(
            self.order != "sorted" or self.dataset == "digits",
            f"order 'sorted' sorts the examples by class label, and dataset {self.dataset!r} has none: "
            "use it with --dataset digits",
        )
        try:
            check_beta(self.noise_beta, "noise_beta")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check(self.accumulate >= 1, f"accumulate must be at least 1, got {self.accumulate}")
        try:
            check_measure_every(self.measure_every)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check(self.data_seed >= -1, f"data_seed must be -1 (the same as seed) or a seed >= 0, got {self.data_seed}")
        self.check_split(1)

    @property
    def auto(self) -> bool:
        """Whether the batch size follows the noise scale (``batch_size = "auto"``)."""
        return self.batch_size == "auto"

    @property
    def first_batch_size(self) -> int:
        """B of the first step: ``batch_size``, or ``min_batch_size`` for ``auto``."""
        return self.min_batch_size if self.auto else self.batch_size

    def check_split(self, workers: int) -> None:
        """Raise ConfigError unless the batch (for ``auto``, the largest) splits evenly into
        workers × accumulate micro-batches."""
        parts = workers * self.accumulate
        name, size = ("max_batch_size", self.max_batch_size) if self.auto else ("batch_size", self.batch_size)
        _check(
            size % parts == 0,
            f"{name} {size} does not split into {workers} worker(s) x {self.accumulate} "
            f"micro-batch(es): use a {name.replace('_', ' ')} divisible by {parts}, or change --accumulate or --nproc",
        )

    @property
    def dataset_seed(self) -> int:
        """The seed of the data and the split: ``data_seed``, or ``seed`` when it is -1."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def micro_batches_per_worker(self, batch: int) -> int:
        """K_b, the micro-batches per worker of a global batch of ``batch`` examples.

        ``accumulate`` for a fixed batch size; for ``auto``, ⌈K · b / B_max⌉, so that a worker's
        micro-batch never exceeds B_max / (W · K) examples whatever b is (W workers).
        """
        if not self.auto:
            return self.accumulate
        return -(-self.accumulate * batch // self.max_batch_size)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a mapping, refusing unknown keys and values of the wrong type."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}: known keys are {', '.join(known)}")
        typed = {}
        for key, value in values.items():
            if key == "batch_size" and value == "auto":
                typed[key] = value
                continue
            kind = {"str": str, "int": int, "int | str": int, "float": float}[known[key].type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                also = " or 'auto'" if key == "batch_size" else ""
                raise ConfigError(f"config key {key!r} must be {kind.__name__}{also}, got {value!r}")
            typed[key] = value
        return cls(**typed)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file of top-level keys (the field names)."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid TOML ({err})") from None
        return cls.from_dict(values)

    def save(self, path: str | Path) -> None:
        """Write the config as TOML, atomically."""
        lines = [f"{k} = {_toml_value(v)}" for k, v in self.to_dict().items()]
        write_atomic(path, "\n".join(lines) + "\n")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
