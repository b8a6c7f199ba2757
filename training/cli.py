"""``python -m training {fit,validate,test,predict} -c configs/NAME.yaml``: the LightningCLI entry point.

    python -m training fit -c configs/quickstart.yaml                    # train, test, export
    python -m training fit -c configs/quickstart.yaml --ckpt_path last   # resume
    python -m training test -c configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    python -m training fit -c configs/mnist_lenet5.yaml --data.root /data --trainer.precision bf16-mixed

The run name is the first config file's stem (or ``--name``): logs, ``config.yaml`` and plots go
to ``runs/<name>/version_N/``, checkpoints to ``runs/<name>/checkpoints/`` (``best-*.ckpt`` by
the model's monitored metric, ``last.ckpt``), and ``fit`` exports the bundle to
``artifacts/<name>/``, under ``$SVERTKA_OUTPUT_DIR`` (default: the current folder). Bad input
ends with one ``error: ...`` line and exit code 2; ``SVERTKA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from data.base import DataError, ImageDataModule
from data.preprocess import ImageError
from models.bundle import BundleError
from models.registry import get_model_builder
from training.callbacks import ExportBundle, ResumableRNG, TrainingPlots, progress_bar
from training.modules import ImageTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def output_root() -> Path:
    """Where ``runs/`` and ``artifacts/`` go: ``$SVERTKA_OUTPUT_DIR``, else the current folder."""
    return Path(os.environ.get("SVERTKA_OUTPUT_DIR") or ".")


class SvertkaCLI(LightningCLI):
    """LightningCLI with Svertka's defaults: linked data/model sizes, checkpoints, loggers, plots, export."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        no_exit = {"exit_on_error": False}
        super().__init__(
            model_class=ImageTask,
            datamodule_class=ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=42,
            auto_configure_optimizers=False,  # the modules take OptimizerCallable / LRSchedulerCallable
            parser_kwargs={**no_exit, **{s: dict(no_exit) for s in SUBCOMMANDS}},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_outputs", "model.init_args.num_outputs", apply_on="instantiate")
        parser.add_argument(
            "--name", type=str | None, default=None,
            help="Run name for runs/<name>/ and artifacts/<name>/ (default: the first config file's stem)",
        )  # fmt: skip
        parser.add_argument(
            "--early_stopping_patience", type=int | None, default=10,
            help="Stop after this many validations without improvement of the monitored metric (null: never)",
        )  # fmt: skip
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="fit: test the best checkpoint after training and add the test metrics to the bundle",
        )  # fmt: skip
        parser.add_argument("--export", type=bool, default=True, help="fit: export the best checkpoint as a bundle")
        parser.add_argument(
            "--num_threads", type=int | None, default=None,
            help="torch.set_num_threads for this run (null: torch's default; 1 is fastest for tiny models)",
        )  # fmt: skip

    # ---- run name and trainer defaults ----
    @property
    def run_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def run_name(self) -> str:
        cfg = self.run_config
        if cfg.get("name"):
            return str(cfg.name)
        configs = cfg.get("config") or []
        if configs:
            return Path(str(configs[0])).stem
        return "run"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer plus Svertka's loggers and callbacks (unless the config brings its own)."""
        cfg = self.run_config
        model: ImageTask = self.model
        name, root = self.run_name, output_root()
        runs = root / "runs"
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_cfg.get("logger") in (None, True):
            csv = CSVLogger(runs, name=name)
            tb = TensorBoardLogger(runs, name=name, version=csv.version, default_hp_metric=False)
            trainer_cfg["logger"] = [csv, tb]
        if trainer_cfg.get("default_root_dir") is None:
            trainer_cfg["default_root_dir"] = str(runs / name)

        given = list(trainer_cfg.get("callbacks") or [])
        given += [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        extra: list[Callback] = [TrainingPlots(), ResumableRNG()]
        if trainer_cfg.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            extra.append(progress_bar())  # redrawn 5 times a second, not after every step
        if not any(isinstance(c, ModelCheckpoint) for c in given):
            ckpt_dir = runs / name / "checkpoints"
            best = ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best-{epoch:02d}",
                monitor=model.monitor,
                mode=model.monitor_mode,
                enable_version_counter=False,
            )
            # Lightning 2.6's save_last only saves when a top-k checkpoint was saved in the same step;
            # resuming needs the latest state every epoch, so "last" is a checkpoint of its own.
            last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
            extra += [best, last]  # the first one is trainer.checkpoint_callback (the best)
        patience = cfg.get("early_stopping_patience")
        if patience is not None and not any(isinstance(c, EarlyStopping) for c in given):
            extra.append(EarlyStopping(monitor=model.monitor, mode=model.monitor_mode, patience=patience))
        if cfg.get("export", True):  # acts at fit end only; present always so checkpoints find it
            self.export_callback = ExportBundle(root / "artifacts" / name)
            extra.append(self.export_callback)
        trainer_cfg["callbacks"] = given
        return self._instantiate_trainer(trainer_cfg, extra)

    def before_instantiate_classes(self) -> None:
        """Apply ``num_threads``; check the network name before anything is built (an error listing the known ones)."""
        if self.run_config.get("num_threads"):
            torch.set_num_threads(int(self.run_config.num_threads))
        model = self.run_config.get("model")
        net = model.get("init_args", {}).get("net") if model is not None else None
        if isinstance(net, str):
            try:
                get_model_builder(net)
            except ValueError as e:
                raise ValueError(f"model.init_args.net: {e}") from None

    def after_instantiate_classes(self) -> None:
        # the run's whole config (plain YAML types) goes into checkpoints and bundles
        self._dump_config()
        if isinstance(self.model, ImageTask):
            self.model.run_config = self.config_dump

    def after_fit(self) -> None:
        """Test the best weights (the bundle's) right after training, unless ``--test_after_fit false``."""
        cfg = self.run_config
        if not cfg.get("test_after_fit", True) or self.trainer.interrupted:
            return
        if not _has_test_split(self.datamodule):
            print("No test split: skipping the test after fit", file=sys.stderr)
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best if best else None)


def _has_test_split(datamodule: Any) -> bool:
    try:
        datamodule.setup("test")
        datamodule.dataset("test")
        return True
    except (DataError, KeyError, NotImplementedError):
        return False
    except AttributeError:  # a data module without the ImageDataModule helpers: assume it has one
        return True


# Errors that mean "bad input" (config, option, data, image): one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError,
    DataError,
    ImageError,
    BundleError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    ValueError,
)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(args: list[str] | None = None) -> int:
    """Run the CLI; bad input ends with ``error: <message>`` on stderr and exit code 2."""
    debug = os.environ.get("SVERTKA_DEBUG", "") not in ("", "0")
    _info_logs_to_stdout()
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        SvertkaCLI(args=args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {_one_line(_root_cause(e))}", file=sys.stderr)
        return 2
    return 0


def check_config_files(argv: list[str]) -> None:
    """Every ``-c/--config FILE`` exists and is valid YAML (a clear error naming the file and line)."""
    paths = [v for k, v in zip(argv, argv[1:], strict=False) if k in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {path}: no such file")
        try:
            yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            where = ""
            if getattr(e, "problem_mark", None) is not None:
                where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
            raise ValueError(f"config file {path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {path}: not a text (YAML) file") from None


def _info_logs_to_stdout() -> None:
    """Lightning's info lines ("Seed set to 42", "GPU available") go to stdout: stderr keeps problems only."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)


def _root_cause(e: BaseException) -> BaseException:
    """The user-facing error inside wrappers (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or e.__context__
        if isinstance(inner, (DataError, ImageError, BundleError, FileNotFoundError)) and not isinstance(
            e, (DataError, ImageError, BundleError, FileNotFoundError)
        ):
            e = inner
            continue
        break
    return e
