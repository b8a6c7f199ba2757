"""The LitServe peer for ``serve_load.py``: LitServe (Lightning's server) with its batching, as its docs show.

    SVERTKA_BENCH_BUNDLE=artifacts/quickstart python benchmarks/_serve_litserve.py --port 8000 --workers 2

``POST /classify`` with a multipart ``image`` file. The HTTP processes parse the form and hand it to
``--workers`` inference processes (``workers_per_device`` on the CPU; as many HTTP processes, LitServe's
default), which decode and preprocess each upload (``data.preprocess``), stack up to ``--max-batch-size``
of them that arrive within ``--batch-timeout`` seconds and run one eager forward (``torch.set_num_threads``:
CPU count / workers). Answers ``{"label", "score", "top_k"}`` like the service.
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import torch

from data.preprocess import ImageError, eval_transform, load_image, preprocess
from models.bundle import load_bundle


class Classify(ls.LitAPI):
    def __init__(self, threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.model, meta = load_bundle(os.environ["SVERTKA_BENCH_BUNDLE"])
        self.spec, self.transform, self.names = meta.preprocess, eval_transform(meta.preprocess), meta.class_names

    def decode_request(self, request) -> torch.Tensor | str:
        try:
            data = request["image"].file.read()
            return preprocess(load_image(data, self.spec.channels), self.spec, self.transform)  # (C, h, w)
        except (ImageError, KeyError, AttributeError) as e:
            return f"bad upload: {e}"

    def batch(self, inputs: list) -> list:
        return inputs  # kept as a list: predict stacks the good ones

    def predict(self, xs: list) -> list:
        good = [x for x in xs if isinstance(x, torch.Tensor)]
        with torch.inference_mode():
            probs = iter(self.model(torch.stack(good)).softmax(dim=1) if good else [])  # (B, N)
        return [next(probs) if isinstance(x, torch.Tensor) else x for x in xs]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output) -> dict:
        if isinstance(output, str):
            return {"error": output}
        scores, idx = output.topk(min(5, len(self.names)))
        top = [{"label": self.names[i], "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]
        return {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="inference processes (and HTTP processes)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill")
    args = p.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    api = Classify(threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
