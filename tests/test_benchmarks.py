"""The benchmarks' own machinery: the load generator counts answers and errors right; the training
ceiling trains what the fit trains."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _loadgen  # noqa: E402


async def _serve(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    return await reader.readexactly(length)


def _load(handler, client: str, clients: int, seconds: float, requests: list[bytes]) -> dict:
    """``_loadgen.run`` with ``client`` against a toy server running ``handler``, one image ``a.png``."""

    async def main() -> dict:
        server, port = await _serve(handler)
        args = argparse.Namespace(
            host="127.0.0.1",
            port=port,
            clients=clients,
            seconds=seconds,
            warmup=0.1,
            timeout=5.0,
            client=client,
            path="/",
            field="image",
            form=["top_k=3"],
        )
        async with server:
            return await _loadgen.run(args, requests, [("a.png", b"x")])

    return asyncio.run(main())


def test_request_is_valid_multipart() -> None:
    req = _loadgen.build_request("h:1", "/classify", "image", "a.png", b"PNGDATA", {"top_k": "3"})
    head, body = req.split(b"\r\n\r\n", 1)
    assert b"POST /classify HTTP/1.1" in head and f"Content-Length: {len(body)}".encode() in head
    assert b'name="image"; filename="a.png"' in body and b"Content-Type: image/png" in body
    assert b"PNGDATA" in body and b'name="top_k"\r\n\r\n3' in body


@pytest.mark.parametrize("client", _loadgen.CLIENTS)
def test_counts_requests_and_errors(client: str) -> None:
    """Every other answer is a 500 and answers alternate between Content-Length and chunked bodies.

    Every load generator: the raw-socket client, one shared ``httpx.AsyncClient``, one per client, one
    shared ``aiohttp.ClientSession``. The httpx and aiohttp uploads carry the file in ``image`` and the
    extra text field (checked in what the server read).
    """
    calls = {"n": 0, "body": b""}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                calls["body"] = await _read_request(reader)
                calls["n"] += 1
                status = b"200 OK" if calls["n"] % 2 else b"500 Internal Server Error"
                if calls["n"] % 4 < 2:
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
                else:
                    writer.write(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    out = _load(handler, client, 2, 0.5, [b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"])
    assert out["requests"] > 10
    assert out["errors"] == pytest.approx(out["requests"] / 2, abs=2)
    assert out["error_kinds"] == {"HTTP 500": out["errors"]}
    assert 0 < out["p50_ms"] <= out["p99_ms"]
    if client != "raw":  # the raw client sends the prebuilt bytes it was given
        body = calls["body"]
        assert b'name="image"; filename="a.png"' in body and b"Content-Type: image/png" in body
        assert b'name="top_k"\r\n\r\n3\r\n' in body


@pytest.mark.parametrize("client", ["httpx", "httpx-per-task", "httpx2"])
def test_shared_httpx_pool_races_when_answers_arrive_together(client: str) -> None:
    """The reason for the three httpx clients: answers that arrive together make httpx's shared pool retry.

    The server answers its 4 clients only once all 4 have asked, all at once, so every round the
    client's event loop sees 4 answers in one pass. httpcore's shared pool then gives the next requests
    the same idle connection (all but one re-queue: counted); 4 separate clients never share one, and
    httpx2's pool (httpcore2) keeps a connection it handed out for that request. The retries are counted
    in each client's own pool package, so httpx2's zero is not a count that was never taken.
    """
    waiting: list[asyncio.StreamWriter] = []

    def answer_all() -> None:
        for w in waiting:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        waiting.clear()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await _read_request(reader)
                waiting.append(writer)
                if len(waiting) == 4:
                    answer_all()
                elif len(waiting) == 1:  # the last round, when some clients have stopped: answer anyway
                    asyncio.get_running_loop().call_later(0.05, answer_all)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    out = _load(handler, client, 4, 1.0, [])
    assert out["errors"] == 0 and out["requests"] > 20
    if client == "httpx":
        assert out["client_pool_retries"] > 0
    else:
        assert out["client_pool_retries"] == 0  # not None: counted


def test_refused_connection_is_an_error() -> None:
    args = argparse.Namespace(
        host="127.0.0.1",
        port=1,
        clients=1,
        seconds=0.2,
        warmup=0.0,
        timeout=1.0,
        client="raw",
        path="/",
        field="image",
        form=[],
    )
    out = asyncio.run(_loadgen.run(args, [b"x"], []))
    assert out["requests"] > 0 and out["errors"] == out["requests"] and out["requests_per_s"] == 0


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
    from _serve_common import BenchError

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
            requests = [_loadgen.build_request("h", "/classify", "image", "a.png", b"PNG", {})]
            return await serve_cpu.send(port, requests, 12, 3)

    assert asyncio.run(main()) == 4 and len(seen) == 12  # 4 of 12 answers were 503
    assert serve_cpu.parse_variant("t:SVERTKA_TRACING=1,A=b") == ("t", None, {"SVERTKA_TRACING": "1", "A": "b"})
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "service.py").write_text("")
    assert serve_cpu.parse_variant(f"old@{tmp_path}") == ("old", tmp_path.resolve(), {})
    for bad in ("service:A=1", "x:A", f"x@{tmp_path / 'nope'}"):
        with pytest.raises(BenchError):
            serve_cpu.parse_variant(bad)


def test_serve_load_pools_alternating_runs() -> None:
    """serve_load splits each load into runs alternating between the servers, then pools each server's runs:
    percentiles over all latencies together (not a mean of per-run percentiles), counts summed, spread kept."""
    import serve_load

    def run(lat: list[float], errors: int, batches: tuple[int, int] | None, retries: int | None) -> dict:
        return {
            "clients": 2, "client": "raw", "seconds": 2.0, "requests": len(lat), "errors": errors,
            "requests_per_s": (len(lat) - errors) / 2.0, "p50_ms": float(np.median(lat)), "p99_ms": max(lat),
            "requests_with_warmup": len(lat) + 5, "loadgen_cpu_fraction": 0.2, "status_counts": {"200": len(lat)},
            "no_retry_after_503s": 0, "client_pool_retries": retries, "latencies_ms": lat, "server_cpu_s": 1.0,
            "error_kinds": {"HTTP 500": errors} if errors else {}, "error_samples": ["HTTP 500: x"] if errors else [],
            "elapsed_s": 2.5, "batch_counts": batches,
        }  # fmt: skip

    fast, slow = [1.0] * 60, [10.0] * 40
    r = serve_load.pool_slices([run(fast, 0, (30, 60), 3), run(slow, 2, (10, 40), None)])
    assert r["requests"] == 100 and r["errors"] == 2 and r["requests_per_s"] == pytest.approx(98 / 4.0)
    assert r["p50_ms"] == 1.0 and r["p99_ms"] == 10.0  # 60 of the 100 pooled latencies are 1 ms
    assert [s["p50_ms"] for s in r["slices"]] == [1.0, 10.0]
    assert r["mean_batch_size"] == pytest.approx(100 / 40) and r["client_pool_retries"] is None
    assert r["server_cpu_ms_per_request"] == pytest.approx(2000 / 110) and r["server_cpu_cores"] == pytest.approx(0.4)
    assert r["error_kinds"] == {"HTTP 500": 2} and r["status_counts"] == {"200": 100}
    assert "latencies_ms" not in r


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
