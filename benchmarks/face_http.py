"""HTTP latency of /estimate_age on a 640x480 photo with one face, at one client, one worker on one core.

    flock /tmp/svertka-bench.lock python benchmarks/face_http.py --model artifacts/utkface_age --repeats 3

Starts ``bentoml serve`` (one worker, one torch thread, pinned to CPU 0 with ``taskset`` when
available) on the bundle, saved into a temporary BentoML home, and sends one request at a time.
Side by side, alternating rounds: ``detect=true`` (find, align, estimate: ours) against
``detect=false`` (the whole upload stretched to the model's input: what /estimate_age did before
the face stage). The photo: scikit-image's astronaut (one face) scaled into a 640x480 scene, as
a JPEG. A bundle without a ``faces`` entry is served with UTKFace's framing added (200 / 0.25).
Prints p50 / p90 per round, the median over rounds with their spread, and the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._serve_common import free_port, server  # noqa: E402


def scene_jpeg() -> bytes:
    """The astronaut (512x512, face ~90 px) at 0.9x on a 640x480 grey-noise scene."""
    from skimage import data

    rng = np.random.default_rng(0)
    scene = rng.integers(90, 140, (480, 640, 3), dtype=np.uint8)
    face = np.asarray(Image.fromarray(data.astronaut()).resize((460, 460)))
    scene[10:470, 90:550] = face
    buf = io.BytesIO()
    Image.fromarray(scene).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    import httpx

    from models.bundle import read_meta
    from models.store import save_bundle_to_bentoml

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an age bundle folder")
    p.add_argument("--requests", type=int, default=100, help="requests per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each mode, alternating")
    args = p.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="svertka-face-http-"))
    try:
        bundle = home / "bundle"
        shutil.copytree(args.model, bundle)
        if not read_meta(bundle).faces:
            meta = json.loads((bundle / "bundle.json").read_text())
            meta["faces"] = {"size": 200, "padding": 0.25}
            (bundle / "bundle.json").write_text(json.dumps(meta))
        os.environ["BENTOML_HOME"] = str(home / "bentoml")
        tag = save_bundle_to_bentoml(bundle, "face_bench")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SVERTKA_")}
        env.update(BENTOML_HOME=str(home / "bentoml"), BENTOML_DO_NOT_TRACK="True", SVERTKA_MODELS=str(tag),
                   SVERTKA_WORKERS="1", SVERTKA_TORCH_THREADS="1", OMP_NUM_THREADS="1")  # fmt: skip
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        cmd = [*pin, sys.executable, "-m", "bentoml", "serve", "--port", str(port), "--host", "127.0.0.1"]
        photo = scene_jpeg()
        url = f"http://127.0.0.1:{port}/estimate_age"
        with server(cmd, env, port, "/readyz", home / "serve.log", timeout=180), httpx.Client(timeout=30) as client:

            def post(detect: str) -> tuple[float, dict]:
                t = time.perf_counter()
                r = client.post(url, files={"image": ("scene.jpg", photo)}, data={"detect": detect})
                dt = (time.perf_counter() - t) * 1000
                r.raise_for_status()
                return dt, r.json()

            _, body = post("true")
            print(f"{len(photo)} byte 640x480 JPEG; faces found: {body['faces']}", flush=True)
            if len(body["faces"]) != 1:
                print("error: the benchmark photo should have exactly one face", file=sys.stderr)
                return 1
            for _ in range(10):  # warm-up
                post("true"), post("false")
            rounds: dict[str, list[tuple[float, float]]] = {"true": [], "false": []}
            for r in range(args.repeats):
                for detect in ("true", "false"):
                    ms = [post(detect)[0] for _ in range(args.requests)]
                    p50, p90 = float(np.percentile(ms, 50)), float(np.percentile(ms, 90))
                    rounds[detect].append((p50, p90))
                    print(f"round {r + 1} detect={detect:5s}: p50 {p50:6.1f} ms  p90 {p90:6.1f} ms", flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    def med(detect: str, i: int) -> tuple[float, float, float]:
        vals = [x[i] for x in rounds[detect]]
        return statistics.median(vals), min(vals), max(vals)

    ours, base = med("true", 0), med("false", 0)
    print(
        f"\n/estimate_age, one client, {args.requests} requests x {args.repeats} rounds (median [min, max] of p50s):\n"
        f"  detect=true  (face stage)  p50 {ours[0]:.1f} ms [{ours[1]:.1f}, {ours[2]:.1f}]  (target <= 100 ms)\n"
        f"  detect=false (whole image) p50 {base[0]:.1f} ms [{base[1]:.1f}, {base[2]:.1f}]\n"
        f"  ratio {ours[0] / base[0]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
