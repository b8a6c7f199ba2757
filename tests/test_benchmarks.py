"""The benchmarks' own machinery: wrk's script and the Python session count answers and errors right; the
training ceiling trains what the fit trains."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _loadgen  # noqa: E402
from _serve_common import build_request  # noqa: E402


async def _serve(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    return await reader.readexactly(length)


def _load(handler, clients: int, seconds: float) -> dict:
    """``_loadgen.run`` (one aiohttp session) against a toy server running ``handler``, one image ``a.png``."""

    async def main() -> dict:
        server, port = await _serve(handler)
        args = argparse.Namespace(
            host="127.0.0.1", port=port, clients=clients, seconds=seconds, warmup=0.1, timeout=5.0, path="/",
            field="image", form=["top_k=3"],
        )  # fmt: skip
        async with server:
            return await _loadgen.run(args, [("a.png", b"x")])

    return asyncio.run(main())


async def _alternating_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, calls: dict) -> None:
    """Every other answer a 500 (every 4th of those a 503 without Retry-After), Content-Length and chunked in turn."""
    try:
        while True:
            calls["body"] = await _read_request(reader)
            calls["n"] += 1
            status = b"200 OK" if calls["n"] % 2 else b"500 Internal Server Error"
            if calls["n"] % 8 == 0:
                status = b"503 Service Unavailable"
            if calls["n"] % 4 < 2:
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
            else:
                writer.write(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def test_request_is_valid_multipart() -> None:
    req = build_request("h:1", "/classify", "image", "a.png", b"PNGDATA")
    head, body = req.split(b"\r\n\r\n", 1)
    assert b"POST /classify HTTP/1.1" in head and f"Content-Length: {len(body)}".encode() in head
    assert b'name="image"; filename="a.png"' in body and b"Content-Type: image/png" in body and b"PNGDATA" in body


def test_python_session_counts_requests_and_errors() -> None:
    """The aiohttp session's tasks: every non-2xx answer is an error, the upload carries the file and the fields."""
    calls = {"n": 0, "body": b""}
    out = _load(lambda r, w: _alternating_answers(r, w, calls), 2, 0.5)
    assert out["requests"] > 10
    assert out["errors"] == pytest.approx(out["requests"] / 2, abs=2)
    assert set(out["error_kinds"]) == {"HTTP 500", "HTTP 503"} and sum(out["error_kinds"].values()) == out["errors"]
    assert out["no_retry_after_503s"] == out["status_counts"]["503"] > 0
    assert 0 < out["p50_ms"] <= out["p99_ms"]
    body = calls["body"]
    assert b'name="image"; filename="a.png"' in body and b"Content-Type: image/png" in body
    assert b'name="top_k"\r\n\r\n3\r\n' in body


def test_refused_connection_is_an_error() -> None:
    args = argparse.Namespace(
        host="127.0.0.1", port=1, clients=1, seconds=0.2, warmup=0.0, timeout=1.0, path="/", field="image", form=[]
    )
    out = asyncio.run(_loadgen.run(args, [("a.png", b"x")]))
    assert out["requests"] > 0 and out["errors"] == out["requests"] and out["requests_per_s"] == 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make wrk)")
def test_wrk_script_uploads_the_images_and_counts_every_status(tmp_path: Path) -> None:
    """The wrk Lua script posts the listed files as multipart uploads; serve_load reads its JSON: non-2xx
    answers are errors, 503s without Retry-After counted."""
    import serve_load

    calls = {"n": 0, "body": b""}
    (tmp_path / "a.png").write_bytes(b"PNGDATA")
    (tmp_path / "files.txt").write_text(f"{tmp_path / 'a.png'}\n")
    result: dict = {}

    async def main() -> None:
        server, port = await _serve(lambda r, w: _alternating_answers(r, w, calls))
        async with server:
            loop = asyncio.get_running_loop()
            result.update(await loop.run_in_executor(None, serve_load.run_wrk, port, tmp_path / "files.txt", 2, 1.0))

    asyncio.run(main())
    assert result["requests"] > 10 and calls["n"] >= result["requests"]
    codes = result["status_counts"]
    assert set(codes) == {"200", "500", "503"} and sum(codes.values()) == result["requests"]
    assert result["errors"] == codes["500"] + codes["503"] and result["no_retry_after_503s"] == codes["503"]
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["broken"] == 0
    body = calls["body"]
    assert b'name="image"; filename="a.png"' in body and b"Content-Type: image/png" in body and b"PNGDATA" in body


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_gpu_benchmarks_say_no_cuda_in_one_line(tmp_path: Path) -> None:
    """Without a GPU both GPU entry points stop at once with one ``error:`` line (nothing half-run)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "DATASETS_DIR": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--accelerator", "gpu"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["error: --accelerator gpu: no CUDA device here"]
    out = tmp_path / "gpu_check"
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == "error: no CUDA device here", r.stderr
    assert not (out / "throughput_fp32.txt").exists()


def test_cpu_benchmark_sends_each_request_once_and_reconnects_when_told(tmp_path: Path) -> None:
    import serve_cpu
    from _serve_common import BenchError, parse_variant

    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                seen.append(await _read_request(reader))
                close = len(seen) % 4 == 0  # every 4th answer closes the connection, as the balancer does
                head = f"HTTP/1.1 {200 if len(seen) % 3 else 503} X\r\nContent-Length: 2\r\n"
                writer.write(head.encode() + (b"Connection: close\r\n" if close else b"") + b"\r\nok")
                await writer.drain()
                if close:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def main() -> int:
        server, port = await _serve(handler)
        async with server:
            requests = [build_request("h", "/classify", "image", "a.png", b"PNG")]
            return await serve_cpu.send(port, requests, 12, 3)

    assert asyncio.run(main()) == 4 and len(seen) == 12  # 4 of 12 answers were 503
    assert parse_variant("t:SVERTKA_MAX_BATCH_SIZE=8,A=b", serve_cpu.VARIANTS) == (
        "t",
        None,
        {"SVERTKA_MAX_BATCH_SIZE": "8", "A": "b"},
    )
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "service.py").write_text("")
    assert parse_variant(f"old@{tmp_path}", serve_cpu.VARIANTS) == ("old", tmp_path.resolve(), {})
    for bad in ("service:A=1", "x:A", f"x@{tmp_path / 'nope'}"):
        with pytest.raises(BenchError):
            parse_variant(bad, serve_cpu.VARIANTS)


def test_serve_load_summarizes_repeats_and_ratios() -> None:
    """Medians over the repeats with their min-max, errors summed, p99/p50 of every run kept; ours over a peer:
    the ratio of the medians and the range of the per-repeat ratios."""
    import serve_load

    def run(rate: float, p50: float, p99: float, errors: int = 0) -> dict:
        return {"requests_per_s": rate, "p50_ms": p50, "p99_ms": p99, "errors": errors}

    ours = serve_load.summarize([run(100, 10, 20), run(300, 5, 50, 1), run(200, 8, 16)])
    assert (ours["requests_per_s"], ours["min"], ours["max"]) == (200, 100, 300)
    assert ours["p50_ms"] == 8 and ours["p99_ms"] == 20 and ours["errors"] == 1
    assert ours["tail_ratios"] == [2.0, 10.0, 2.0]
    peer = serve_load.summarize([run(50, 1, 2), run(100, 1, 2), run(400, 1, 2)])
    assert serve_load.ratio(ours, peer) == (2.0, 0.5, 3.0)
    wrk = {"requests": 100, "duration_us": 2_000_000, "connect_errors": 1, "read_errors": 0, "write_errors": 0,
           "status_errors": 4, "timeouts": 2, "p50_us": 1500, "p90_us": 2000, "p99_us": 9000, "max_us": 12000,
           "mean_us": 1700.0, "status_counts": {"200": 96, "503": 4}, "no_retry_after_503s": 0}  # fmt: skip
    r = serve_load.wrk_summary(wrk)
    assert r["errors"] == 7 and r["broken"] == 3 and r["requests_per_s"] == 48 and r["p99_ms"] == 9.0


def test_train_throughput_reports_the_cpu_time_the_host_stole() -> None:
    """The share of CPU ticks stolen between two readings; nan when a reading is missing or no time passed."""
    import train_throughput

    assert train_throughput.stolen_share((10, 1_000), (40, 1_300)) == pytest.approx(0.1)
    assert math.isnan(train_throughput.stolen_share(None, (40, 1_300)))
    assert math.isnan(train_throughput.stolen_share((10, 1_000), (10, 1_000)))
    ticks = train_throughput.cpu_ticks()
    if Path("/proc/stat").exists():
        assert ticks is not None and 0 <= ticks[0] <= ticks[1]


def test_ceiling_trains_what_the_fit_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training ceiling's bare loop and ``python -m training fit`` of the same run end with the same weights.

    Same seed, network, optimizer and settings, loss, batches in the same order: what the throughput
    benchmark calls the ceiling does the fit's work and nothing else. Both time the batches after the
    warm-up ones only.
    """
    import _ceiling

    from training.cli import SvertkaCLI

    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("SVERTKA_BENCH_WARMUP", "1")
    monkeypatch.setenv("SVERTKA_BENCH_OUT", str(tmp_path / "fit.json"))
    args = ["-c", str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
            "--early_stopping_patience=null", "--test_after_fit=false", "--export=false"]  # fmt: skip
    fit = SvertkaCLI(args=["fit", *args, "--trainer.callbacks+=_timing.EpochTimer"])
    ceiling = SvertkaCLI(args=args, run=False)
    before = {k: v.clone() for k, v in ceiling.model.state_dict().items()}
    epochs = _ceiling.train(ceiling)

    after, trained = ceiling.model.state_dict(), fit.model.state_dict()
    assert after.keys() == trained.keys()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it did train
    for k in after:
        torch.testing.assert_close(after[k], trained[k], rtol=1e-5, atol=1e-6, msg=k)
    timed = json.loads((tmp_path / "fit.json").read_text())
    assert len(epochs) == len(timed) == 1
    assert epochs[0]["images"] == timed[0]["images"] == 3 * 32  # batches 2 to 4
    assert all(e["images_per_s"] > 0 for e in epochs + timed)
