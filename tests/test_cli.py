"""``python -m training``: the demo run, DDP on CPU, and bad input (one ``error:`` line, exit 2, no traceback).

.venv/bin/pytest tests/test_cli.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
PRINT_CONFIG = REPO / "tests" / "print_config.json"  # the --print_config keys and defaults to keep


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m training ARGS`` in ``cwd`` (so runs/ and artifacts/ land there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("SVERTKA_DEBUG", "SVERTKA_OUTPUT_DIR"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "training", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_quickstart_demo_reaches_95_percent(tmp_path: Path) -> None:
    """What ``make demo`` runs: the full quickstart, test accuracy >= 0.95, the bundle path printed."""
    r = run_cli("fit", "-c", QUICKSTART, "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Bundle: artifacts/quickstart" in r.stdout
    meta = json.loads((tmp_path / "artifacts/quickstart/bundle.json").read_text())
    assert meta["metrics"]["test/acc"] >= 0.95, meta["metrics"]
    assert f"test/acc={meta['metrics']['test/acc']:.4f}" in r.stdout


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """A 2-process CPU DDP fit (gloo) exits 0, writes checkpoints, tests and exports on rank 0."""
    r = run_cli(
        "fit", "-c", QUICKSTART, "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "runs/quickstart/checkpoints"
    assert (ckpts / "last.ckpt").is_file() and list(ckpts.glob("best-*.ckpt"))
    meta = json.loads((tmp_path / "artifacts/quickstart/bundle.json").read_text())
    assert "test/acc" in meta["metrics"]
    assert r.stdout.count("Bundle: artifacts/quickstart  (test/") == 1  # printed by rank 0 only


def test_unknown_model_is_one_line(tmp_path: Path) -> None:
    r = run_cli("fit", "-c", QUICKSTART, "--model.init_args.net", "lenet6", cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == error_lines(r.stderr)  # nothing but the error line
    (line,) = error_lines(r.stderr)
    assert "'lenet6'" in line and "known models:" in line and "lenet5" in line
    assert not (tmp_path / "runs").exists()


# In-process through ``main`` (the same code path as the subprocess, minus ~8 s of imports each).


def test_missing_data_root(tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    missing = tmp_path / "no_such_root"
    args = ["fit", "-c", str(REPO / "configs/mnist_lenet5.yaml"), "--data.root", str(missing)]
    assert main(args) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert str(missing) in line


def test_malformed_yaml(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  class_path: training.ImageClassifier\n  init_args: [unclosed\n")
    assert main(["fit", "-c", str(bad)]) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert "broken.yaml" in line and "line 4" in line
    assert main(["fit", "-c", str(tmp_path / "absent.yaml")]) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert "absent.yaml" in line


def test_unknown_option(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert main(["fit", "-c", QUICKSTART, "--trainer.max_epochz", "3"]) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert "max_epochz" in line


def test_debug_env_shows_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVERTKA_DEBUG", "1")
    with pytest.raises(ValueError, match="known models"):
        main(["fit", "-c", QUICKSTART, "--model.init_args.net", "lenet6"])


def test_corrupt_image_in_folder(tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = ["fit", "-c", QUICKSTART, "--data", "data.folder.ImageFolderDataModule", "--data.root", str(root),
            "--data.on_bad_image", "error", "--trainer.fast_dev_run", "1"]  # fmt: skip
    assert main(args) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert "broken.png" in line


# --print_config: every data module and LightningModule keeps its keys (and each class its defaults) while
# subclasses take their parents' arguments through **kwargs (jsonargparse follows them into the parents).


def print_config(args: list[str]) -> dict:
    """``python -m training ARGS --print_config`` in-process, parsed (nothing is built or trained)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def class_defaults_args(class_path: str) -> list[str]:
    """``fit`` arguments that print ``class_path``'s defaults (the other section: any class; a CSV needs a file)."""
    if class_path.startswith("training."):
        return ["fit", "--model", class_path, "--data", "data.digits.DigitsDataModule"]
    required = ["--data.csv", "x.csv"] if class_path.endswith("CSVDataModule") else []
    return ["fit", "--model", "training.ImageClassifier", "--data", class_path, *required]


def section_of(class_path: str) -> str:
    return "model" if class_path.startswith("training.") else "data"


RECORDED = json.loads(PRINT_CONFIG.read_text())
RECORD = f"PYTHONPATH=. python {Path(__file__).relative_to(REPO)} --record"


@pytest.mark.parametrize("config", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_print_config_keeps_every_key(config: str) -> None:
    recorded = RECORDED["configs"].get(config)
    assert recorded, f"configs/{config}.yaml has no entry in {PRINT_CONFIG.name} ({RECORD})"
    cfg = print_config(["fit", "-c", str(REPO / "configs" / f"{config}.yaml")])
    for section in ("model", "data"):
        class_path, keys = recorded[section]
        assert cfg[section]["class_path"] == class_path
        assert sorted(cfg[section]["init_args"]) == keys, section


@pytest.mark.parametrize("class_path", sorted(RECORDED["defaults"]))
def test_print_config_keeps_each_class_defaults(class_path: str) -> None:
    cfg = print_config(class_defaults_args(class_path))
    assert cfg[section_of(class_path)]["init_args"] == RECORDED["defaults"][class_path]


def record_print_config() -> None:
    """Write tests/print_config.json from the code as it is (for an intended change of the CLI's interface)."""
    configs = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = print_config(["fit", "-c", str(path)])
        configs[path.stem] = {s: [cfg[s]["class_path"], sorted(cfg[s]["init_args"])] for s in ("model", "data")}
    defaults = {c: print_config(class_defaults_args(c))[section_of(c)]["init_args"] for c in RECORDED["defaults"]}
    lines = [f'  "_about": {json.dumps(RECORDED["_about"])}']
    for name, table in (("configs", configs), ("defaults", defaults)):
        rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items())
        lines.append(f'  "{name}": {{\n{rows}\n  }}')
    PRINT_CONFIG.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    record_print_config()
