"""Training: LightningModules, callbacks, checkpoints, export, and every config on tiny data.

.venv/bin/pytest tests/test_training.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from data.base import Augment, ImageDataModule, Split
from data.digits import DigitsDataModule
from training import AgeRegressor, ImageClassifier
from training.callbacks import ExportBundle, TrainingPlots, load_checkpoint, progress_bar
from training.cli import main
from training.export import export_checkpoint
from training.export import main as export_main
from training.modules import _loggers_write_this_step

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child ``python``: repo importable from any cwd, one thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("SVERTKA_DEBUG", None)
    return env


class TinyAgeDataModule(ImageDataModule):
    """Synthetic faces-free "age" data: 3-channel noise whose brightness encodes the age (learnable)."""

    task = "regression"
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.25, 0.25, 0.25)

    def __init__(self, root: str | None = None, batch_size: int = 16, input_size: int = 32, n: int = 96) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            input_size=input_size,
            in_channels=3,
            target={"name": "age", "min": 0.0, "max": 100.0},
        )
        self.n = n

    def load_splits(self) -> dict[str, Split]:
        rng = np.random.default_rng(0)
        ages = rng.uniform(1, 99, size=self.n).astype(np.float32)
        h, w = self.preprocess_spec.input_size
        base = (ages / 100 * 255)[:, None, None, None]
        images = np.clip(base + rng.normal(0, 20, size=(self.n, h, w, 3)), 0, 255).astype(np.uint8)
        data = Split(images, ages)
        third = self.n // 3
        idx = np.arange(self.n)
        parts = idx[:third], idx[third : 2 * third], idx[2 * third :]
        return {name: data.take(part) for name, part in zip(("train", "val", "test"), parts, strict=True)}


def tiny_trainer(tmp_path: Path, **kw) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        limit_test_batches=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kw})


# ---------------------------------------------------------------- LightningModules


def test_train_step_logging_follows_lightnings_own_rule(tmp_path: Path) -> None:
    """The public-attribute rule for logging ``train/loss_step`` agrees with Lightning's private one at every step."""
    seen: list[tuple[bool, bool]] = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            seen.append((_loggers_write_this_step(trainer), trainer._logger_connector.should_update_logs))

    kw = dict(log_every_n_steps=3, accumulate_grad_batches=2, max_epochs=2, limit_train_batches=7, limit_val_batches=1)
    tiny_trainer(tmp_path, callbacks=[Probe()], **kw).fit(ImageClassifier("lenet5"), DigitsDataModule(batch_size=32))
    ours = [a for a, _ in seen]
    assert len(seen) == 14 and any(ours) and not all(ours)
    assert ours == [b for _, b in seen]


def test_classifier_metrics_checkpoint_and_bundle(tmp_path: Path) -> None:
    """A plain Trainer: the logged names, the confusion matrix, a weights_only checkpoint, the bundle."""
    dm = DigitsDataModule(batch_size=32)
    model = ImageClassifier("lenet5", in_channels=dm.in_channels, num_outputs=dm.num_outputs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=model.monitor, mode=model.monitor_mode, save_last=True)
    export = ExportBundle(tmp_path / "bundle")
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[ckpt, export, TrainingPlots()])
    trainer.fit(model, dm)
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/f1", "val/top5"):
        assert key in trainer.callback_metrics, key
    results = trainer.test(model, dm, ckpt_path="best", verbose=False)[0]
    assert {"test/acc", "test/top5", "test/f1", "test/loss"} <= set(results)
    cm = model.test_confusion_matrix
    assert cm.shape == (10, 10) and int(cm.sum()) == min(3 * 32, len(dm.dataset("test")))

    raw = load_checkpoint(ckpt.best_model_path)  # plain types only: weights_only=True loads it
    meta = raw["svertka"]
    assert meta["architecture"] == "lenet5" and meta["architecture_kwargs"] == {"in_channels": 1, "num_outputs": 10}
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["task"] == "classification"
    assert meta["preprocess"]["input_size"] == [28, 28] and "val/acc" in meta["metrics"]

    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert bundle["metrics"]["test/acc"] == pytest.approx(results["test/acc"])
    assert bundle["metrics"]["val/acc"] == pytest.approx(float(ckpt.best_model_score))
    assert bundle["architecture"] == {"name": "lenet5", "kwargs": {"in_channels": 1, "num_outputs": 10}}


def test_overfit_a_few_batches_loss_falls(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=32)
    model = ImageClassifier("lenet5", in_channels=1, num_outputs=10)
    plots = TrainingPlots()
    trainer = tiny_trainer(tmp_path, max_epochs=25, overfit_batches=2, limit_val_batches=0, callbacks=[plots])
    trainer.fit(model, dm)
    losses = [row["train/loss"] for row in plots.history]
    assert len(losses) == 25
    assert losses[-1] < 0.2 * losses[0], losses


def test_regressor_metrics_clamp_and_plots(tmp_path: Path) -> None:
    dm = TinyAgeDataModule()
    model = AgeRegressor("lenet5", in_channels=3, num_outputs=1, loss="smooth_l1")
    trainer = Trainer(
        default_root_dir=tmp_path, max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TrainingPlots(), ExportBundle(tmp_path / "bundle")],
    )  # fmt: skip
    trainer.fit(model, dm)
    assert model.target == {"name": "age", "min": 0.0, "max": 100.0}  # from the data module
    assert {"val/mae", "val/rmse", "val/cs5"} <= set(trainer.callback_metrics)
    res = trainer.test(model, dm, verbose=False)[0]
    assert {"test/mae", "test/rmse", "test/cs5"} <= set(res) and 0.0 <= res["test/cs5"] <= 1.0
    pred, true = model.test_predictions
    assert pred.shape == true.shape == (len(dm.dataset("test")),)
    assert float(pred.min()) >= 0.0 and float(pred.max()) <= 100.0
    plots = tmp_path / "plots"
    for name in ("curves.png", "age_scatter.png", "age_mae_by_decade.png"):
        assert (plots / name).stat().st_size > 1000, name
    decades = pd.read_csv(plots / "age_mae_by_decade.csv")
    assert decades["n"].iloc[:-1].sum() == decades["n"].iloc[-1] == len(true)
    assert decades["mae"].iloc[-1] == pytest.approx(float((pred - true).abs().mean()), abs=1e-4)
    x = torch.full((2, 3, 32, 32), 50.0)  # absurd input -> raw output far outside [0, 100]
    with torch.no_grad():
        out = model.predict_step(x, 0)
    assert out.shape == (2,) and float(out.min()) >= 0 and float(out.max()) <= 100
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert bundle["task"] == "regression" and bundle["target"]["max"] == 100.0


def test_linear_head_bias_starts_at_mean_training_target(tmp_path: Path) -> None:
    """A fresh linear head starts at the mean training age, not the middle of the range; the bundle is unchanged."""
    dm = TinyAgeDataModule(n=300)  # train ages ~ U(1, 99) over 100 images: the mean is not exactly 50
    model = AgeRegressor("lenet5", in_channels=3, num_outputs=1)
    trainer = tiny_trainer(tmp_path, limit_train_batches=0, limit_val_batches=0)
    trainer.fit(model, dm)  # setup only: no step has moved the bias
    mean = float(dm.splits["train"].targets.mean())
    assert abs(mean - 50.0) > 0.5
    assert float(model.net.head.bias.detach()) == pytest.approx(mean, abs=1e-4)
    assert model.svertka_meta()["target"] == {"name": "age", "min": 0.0, "max": 100.0}


def test_distribution_head_with_flip_tta_bundle_scores_like_test_step(tmp_path: Path) -> None:
    """DEX/DLDL head + flip TTA: the bundle (through serving's Predictor) reproduces the test step's MAE."""
    from serving.predictor import Predictor

    dm = TinyAgeDataModule()
    model = AgeRegressor("lenet5", in_channels=3, head="distribution", value_range=(0, 100), tta_hflip=True)
    assert model.net.head.out_features == 101 and model.hparams.num_outputs == 1
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=None,
                           limit_test_batches=None, callbacks=[ExportBundle(tmp_path / "bundle")])  # fmt: skip
    trainer.fit(model, dm)
    res = trainer.test(model, dm, verbose=False)[0]
    pred, true = model.test_predictions
    assert float(pred.min()) >= 0 and float(pred.max()) <= 100
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["tta"] == ["hflip"] and meta["target"]["bins"] == [float(i) for i in range(101)]
    assert meta["architecture"]["kwargs"]["num_outputs"] == 101
    predictor = Predictor(tmp_path / "bundle", device="cpu")
    assert predictor.info()["head"] == "distribution over 101 values" and "bins" not in predictor.info()["target"]
    x = torch.cat([x for x, _ in dm.test_dataloader()])
    served = predictor.predict_tensors(x)
    assert torch.allclose(served, pred, atol=1e-4)
    assert float((served - true).abs().mean()) == pytest.approx(res["test/mae"], abs=1e-4)
    # flip averaging is real (model.onnx has it inside; the eager module reads meta.tta): without it, other numbers
    eager = Predictor(tmp_path / "bundle", device="cpu", runtime="torch")
    assert torch.allclose(eager.predict_tensors(x), served, atol=1e-4)
    eager.meta.tta = []
    assert not torch.allclose(eager.predict_tensors(x), served, atol=1e-4)


def test_classifier_flip_tta_in_test_step_and_bundle(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=64)
    model = ImageClassifier("lenet5", in_channels=1, num_outputs=10, tta_hflip=True)
    trainer = tiny_trainer(tmp_path, callbacks=[ExportBundle(tmp_path / "bundle")])
    trainer.fit(model, dm)
    res = trainer.test(model, dm, verbose=False)[0]
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        probs = model.predict_step(x, 0)
        plain = model(x).softmax(-1)
        mirrored = model(x.flip(-1)).softmax(-1)
    assert torch.allclose(probs, (plain + mirrored) / 2, atol=1e-6)
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tta"] == ["hflip"]
    assert 0.0 <= res["test/acc"] <= 1.0


def test_losses_and_bad_arguments() -> None:
    for loss in ("l1", "mse", "smooth_l1"):
        AgeRegressor("lenet5", in_channels=3, loss=loss)
    with pytest.raises(ValueError, match="loss must be one of"):
        AgeRegressor("lenet5", in_channels=3, loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known models: .*lenet5"):
        ImageClassifier("no_such_net")
    with pytest.raises(ValueError, match="head must be"):
        AgeRegressor("lenet5", head="ordinal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="value_range"):
        AgeRegressor("lenet5", head="distribution", value_range=(5, 5))
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier("lenet5", label_smoothing=1.5)


def test_one_cycle_gets_total_steps_from_trainer(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=64)
    sched = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01)
    model = ImageClassifier("lenet5", lr_scheduler=sched, scheduler_interval="step")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, dm)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    assert scheduler.scheduler.total_steps == 8  # 2 epochs x 4 batches
    assert trainer.global_step == 8


def test_channels_last_gives_same_outputs() -> None:
    a = ImageClassifier("lenet5")
    b = ImageClassifier("lenet5", channels_last=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def _fit_and_export(tmp_path: Path, name: str, accelerator: str = "cpu", precision: str = "32-true", **kw) -> Path:
    """2 epochs x 3 batches of lenet5 on digits with augmentation; the bundle's folder."""
    dm_kw = {k: kw.pop(k) for k in ("num_workers", "pin_memory") if k in kw}
    dm = DigitsDataModule(batch_size=32, augment=Augment(shift=0.1, rotate=10), **dm_kw)
    torch.manual_seed(0)
    model = ImageClassifier("lenet5", **kw)
    trainer = tiny_trainer(tmp_path / name, accelerator=accelerator, precision=precision, max_epochs=2,
                           limit_train_batches=3, callbacks=[ExportBundle(tmp_path / name / "bundle")])  # fmt: skip
    trainer.fit(model, dm)
    return tmp_path / name / "bundle"


def _same_bundle_format(plain: Path, other: Path) -> None:
    """Same metadata (but the config and metrics), same tensor names, shapes, dtypes, plain contiguous layout."""
    from safetensors.torch import load_file

    a, b = (json.loads((p / "bundle.json").read_text()) for p in (plain, other))
    for key in ("task", "architecture", "class_names", "preprocess", "tta", "augmentation", "format_version"):
        assert a[key] == b[key], key
    wa, wb = load_file(plain / "model.safetensors"), load_file(other / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype == torch.float32, k
        assert wb[k].is_contiguous(), k


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle of ``_fit_and_export`` without speed options, fitted once for the tests that compare with it."""
    return _fit_and_export(tmp_path_factory.mktemp("plain"), "plain")


@pytest.mark.parametrize("compile_net", [False, True], ids=["channels_last+bf16", "compiled"])
def test_speed_options_give_the_same_bundle(tmp_path: Path, compile_net: bool, plain_bundle: Path) -> None:
    """channels_last, bf16-mixed (CPU autocast) and torch.compile change the speed, not the bundle."""
    plain = plain_bundle
    if compile_net:
        fast = _fit_and_export(tmp_path, "fast", compile_net=True)
    else:
        fast = _fit_and_export(tmp_path, "fast", precision="bf16-mixed", channels_last=True)
    _same_bundle_format(plain, fast)
    from models.bundle import load_bundle

    net, _ = load_bundle(fast)
    ckpt_free = ImageClassifier("lenet5")
    ckpt_free.net.load_state_dict(net.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ckpt_free.eval()(x), atol=1e-5, rtol=1e-5)
    if compile_net:  # the compiled module stays out of the state dict
        assert all(not k.startswith("_train_net") and "_orig_mod" not in k for k in ckpt_free.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_options_train_and_give_the_same_bundle(tmp_path: Path, plain_bundle: Path) -> None:
    """On a GPU: bf16-mixed, channels_last, torch.compile, pinned memory, persistent workers; same bundle."""
    plain = plain_bundle
    fast = _fit_and_export(
        tmp_path, "gpu", accelerator="gpu", precision="bf16-mixed", channels_last=True, compile_net=True,
        num_workers=2, pin_memory=True,
    )  # fmt: skip
    _same_bundle_format(plain, fast)


# ---------------------------------------------------------------- configs


def _offline(cfg: dict) -> dict:
    """No pretrained download here (the loader of local weight files has its own tests)."""
    kwargs = (cfg["model"].get("init_args") or {}).get("net_kwargs") or {}
    if kwargs.get("weights"):
        kwargs["weights"] = None
    return cfg


def _tiny_config(cfg_path: Path, out_dir: Path) -> Path:
    """The config with its data swapped for tiny offline data of the same kind, under the same file name."""
    cfg = _offline(yaml.safe_load(cfg_path.read_text()))
    init = cfg["data"].get("init_args") or {}
    size = init.get("input_size", 28)
    if cfg["model"]["class_path"].endswith("AgeRegressor"):
        cfg["data"] = {"class_path": "test_training.TinyAgeDataModule", "init_args": {"input_size": size}}
    elif not cfg["data"]["class_path"].endswith("DigitsDataModule"):
        cfg["data"] = {"class_path": "data.digits.DigitsDataModule", "init_args": {"input_size": size}}
    out = out_dir / cfg_path.name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_fast_dev_run(cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each config parses, builds its model and runs one batch of fit/val/test (tiny data when real is absent)."""
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    tiny = _tiny_config(cfg_path, tmp_path)
    args = ["fit", "-c", str(tiny), "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
            "--data.init_args.batch_size", "8"]  # fmt: skip
    assert main(args) == 0


UTKFACE_FILES = 600  # real UTKFace chips for the recipes' 2 batches (all 19,362 decode in ~50 s on 2 cores)


def _utkface_subset(out: Path) -> Path:
    """A data root whose UTKFace/ links ~UTKFACE_FILES real chips spread over the sorted names (all ages)."""
    files = sorted((Path(os.environ["DATASETS_DIR"]) / "UTKFace").glob("*.jpg"))
    step = max(1, len(files) // UTKFACE_FILES)
    (out / "UTKFace").mkdir(parents=True)
    for f in files[::step]:
        (out / "UTKFace" / f.name).symlink_to(f)
    return out


@pytest.mark.datasets
@pytest.mark.parametrize("cfg_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_fast_dev_run_real_data(cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each recipe as written trains 2 batches on the real data set (no pretrained download, batches of 32;
    UTKFace: a spread subset of its real chips, decoded into the test's own cache)."""
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    cfg = _offline(yaml.safe_load(cfg_path.read_text()))
    args = ["fit", "-c", str(tmp_path / cfg_path.name), "--trainer.fast_dev_run", "2", "--trainer.accelerator", "cpu",
            "--data.init_args.batch_size", "32"]  # fmt: skip
    if cfg["data"]["class_path"].endswith("UTKFaceDataModule"):
        cfg["data"]["init_args"]["cache_dir"] = str(tmp_path / "cache")
        args += ["--data.root", str(_utkface_subset(tmp_path / "data"))]
    (tmp_path / cfg_path.name).write_text(yaml.safe_dump(cfg))
    assert main(args) == 0


# ---------------------------------------------------------------- resume, export, parity


def _fit(tmp_path: Path, name: str, epochs: int, *extra: str) -> int:
    args = ["fit", "-c", str(REPO / "configs" / "quickstart.yaml"), "--name", name,
            "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "6",
            "--trainer.limit_val_batches", "3", "--trainer.enable_progress_bar", "false",
            "--test_after_fit", "false", "--export", "false", *extra]  # fmt: skip
    return main(args)


def test_resume_matches_uninterrupted_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fit 1 epoch, then resume with ``--ckpt_path last`` to 3: same step, metrics and weights as 3 straight."""
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    assert _fit(tmp_path, "straight", 3) == 0
    assert _fit(tmp_path, "resumed", 1) == 0
    first = load_checkpoint(tmp_path / "runs/resumed/checkpoints/last.ckpt")
    assert first["epoch"] == 0 and first["global_step"] == 6
    assert _fit(tmp_path, "resumed", 3, "--ckpt_path", "last") == 0
    a = load_checkpoint(tmp_path / "runs/straight/checkpoints/last.ckpt")
    b = load_checkpoint(tmp_path / "runs/resumed/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 18
    assert a["svertka"]["metrics"].keys() == b["svertka"]["metrics"].keys()
    for k, v in a["svertka"]["metrics"].items():
        assert b["svertka"]["metrics"][k] == pytest.approx(v, abs=1e-6), k
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=1e-5)
    history = b["callbacks"]["TrainingPlots"]["history"]
    assert [int(r["epoch"]) for r in history] == [0, 1, 2]


AUGMENT = {
    "random_crop_padding": 2,
    "rotate": 10,
    "affine_p": 1.0,
    "transform": [  # albumentations' own serialized form; GaussNoise has no batched version
        {"__class_fullname__": "GaussNoise", "std_range": [0.02, 0.06], "p": 0.5},
        {"__class_fullname__": "HorizontalFlip", "p": 0.5},
        {"__class_fullname__": "CoarseDropout", "hole_height_range": [0.1, 0.25], "p": 0.5},
    ],
}


def test_mid_epoch_resume_with_augmentation_matches_uninterrupted_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill after 9 steps (mid 2nd epoch), resume from that checkpoint: same weights as 12 straight steps.

    The augmentation has a per-sample part (albumentations, in a loader worker on resume) and a
    batched part (the engine's generator is in the checkpoint); the straight run also exports the
    bundle, which records the resolved pipeline, as the run's config.yaml records the config.
    """
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    aug = ["--data.init_args.augment", json.dumps(AUGMENT), "--trainer.max_epochs", "2"]
    assert _fit(tmp_path, "straight", 2, *aug, "--export", "true") == 0
    kill = ["--trainer.max_steps", "9", "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'killed'}", "--trainer.callbacks.every_n_train_steps=9",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename=step9"]  # fmt: skip
    assert _fit(tmp_path, "resumed", 2, *aug, *kill) == 0
    killed = load_checkpoint(tmp_path / "killed" / "step9.ckpt")
    assert killed["global_step"] == 9 and killed["epoch"] == 1  # 3 batches into the 2nd epoch
    resume = ["--ckpt_path", str(tmp_path / "killed" / "step9.ckpt"), "--data.init_args.num_workers", "1"]
    assert _fit(tmp_path, "resumed", 2, *aug, *resume) == 0
    a = load_checkpoint(tmp_path / "runs/straight/checkpoints/last.ckpt")
    b = load_checkpoint(tmp_path / "runs/resumed/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0)

    bundle = json.loads((tmp_path / "artifacts/straight/bundle.json").read_text())
    ops = [t["__class_fullname__"] for t in bundle["augmentation"]["transform"]["transforms"]]
    assert ops == ["PadIfNeeded", "RandomCrop", "Affine", "GaussNoise", "HorizontalFlip", "CoarseDropout"]
    config = yaml.safe_load((tmp_path / "runs/straight/version_0/config.yaml").read_text())
    assert config["data"]["init_args"]["augment"]["transform"][0]["__class_fullname__"] == "GaussNoise"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short quickstart fit (with test and export) shared by the export and parity tests."""
    out = tmp_path_factory.mktemp("run")
    os.environ["SVERTKA_OUTPUT_DIR"] = str(out)
    try:
        assert _fit(out, "quickstart", 2, "--test_after_fit", "true", "--export", "true") == 0
    finally:
        del os.environ["SVERTKA_OUTPUT_DIR"]
    return out


def test_fit_exports_bundle_with_test_metrics(trained_run: Path) -> None:
    bundle = json.loads((trained_run / "artifacts/quickstart/bundle.json").read_text())
    assert {"test/acc", "test/f1", "test/top5", "val/acc"} <= set(bundle["metrics"])
    assert bundle["training_config"]["model"]["init_args"]["net"] == "lenet5"
    run = trained_run / "runs/quickstart/version_0"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert (run / "plots/curves.png").is_file() and (run / "plots/confusion_matrix.png").is_file()
    assert any(run.glob("events.out.tfevents.*"))
    assert (trained_run / "runs/quickstart/checkpoints/last.ckpt").is_file()


def test_export_checkpoint_function(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "runs/quickstart/checkpoints/last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "b")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)] and "val/acc" in meta["metrics"]
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "c")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        export_checkpoint(tmp_path / "bad.ckpt", tmp_path / "c")


def test_bundle_matches_lightning_module_without_lightning(trained_run: Path, tmp_path: Path) -> None:
    """The bundle, loaded in a process that never imports Lightning, gives the module's outputs (1e-5)."""
    bundle = trained_run / "artifacts/quickstart"
    best = json.loads((bundle / "bundle.json").read_text())
    ckpts = sorted((trained_run / "runs/quickstart/checkpoints").glob("best-*.ckpt"))
    assert len(ckpts) == 1
    model = ImageClassifier.load_from_checkpoint(ckpts[0], weights_only=True).eval()
    dm = DigitsDataModule(batch_size=64)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        expected = model(x)
    torch.save({"x": x, "y": expected}, tmp_path / "batch.pt")
    code = f"""
import sys, torch
from models.bundle import load_bundle
net, meta = load_bundle({str(bundle)!r})
b = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
with torch.no_grad():
    out = net(b["x"])
assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules, "lightning was imported"
diff = (out - b["y"]).abs().max().item()
assert diff <= 1e-5, diff
print("max_abs_diff", diff, meta.task)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "max_abs_diff" in r.stdout and "classification" in r.stdout
    assert best["metrics"]["val/acc"] > 0


def test_export_cli_with_bentoml(trained_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    ckpt = trained_run / "runs/quickstart/checkpoints/last.ckpt"
    env = subprocess_env(BENTOML_HOME=str(tmp_path / "bentoml"))
    cmd = [sys.executable, "-m", "training.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "b"),
           "--bentoml", "digits"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Bundle:" in r.stdout and "BentoML model: digits:" in r.stdout, r.stdout
    store = list((tmp_path / "bentoml" / "models" / "digits").glob("*/bundle.json"))
    assert len(store) == 1 and (store[0].parent / "model.safetensors").is_file()

    assert export_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [f"error: --ckpt {tmp_path / 'missing.ckpt'}: no such file"]


def test_show_and_export_existing_bundle(trained_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from training.show import main as show_main

    assert show_main([str(trained_run / "artifacts/quickstart")]) == 0
    out = capfd.readouterr().out
    assert "lenet5" in out and "test/acc" in out and "Classes:      10" in out
    assert export_main(["--bundle", str(tmp_path / "nope")]) == 2
    assert "nope" in capfd.readouterr().err
    assert export_main(["--bundle", str(trained_run / "artifacts/quickstart")]) == 0


def test_rich_bar_polls_as_often_as_it_redraws() -> None:
    """Lightning's rich bar wakes a thread 100 times a second by default; ours as often as it redraws (5)."""
    from training.callbacks import ThrottledRichProgressBar

    bar = ThrottledRichProgressBar()
    assert bar.refresh_rate == round(1 / bar.interval) == 5 and bar.is_enabled


@pytest.mark.parametrize("bar", [False, True])
def test_step_loss_is_logged_only_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bar: bool) -> None:
    """``train/loss_step`` goes to ``self.log`` on the logger's steps and the bar's redraws, not every step.

    Without a progress bar only the logger reads it: every ``log_every_n_steps``-th step (4 of 12).
    """
    logged: list[int] = []
    original = ImageClassifier.log

    def log(self, name, *args, **kwargs):
        if name == "train/loss_step":
            logged.append(self.trainer.global_step)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(ImageClassifier, "log", log)
    dm = DigitsDataModule(batch_size=32)
    model = ImageClassifier("lenet5", in_channels=dm.in_channels, num_outputs=dm.num_outputs)
    kw = {"enable_progress_bar": True, "callbacks": [progress_bar()]} if bar else {}
    trainer = tiny_trainer(tmp_path, limit_train_batches=12, log_every_n_steps=3, **kw)
    trainer.fit(model, dm)
    if bar:  # the throttled bar redraws at the first and the last step (and every 0.2 s)
        assert {0, 2, 5, 8, 11} <= set(logged)
    else:
        assert logged == [2, 5, 8, 11]
