"""Train/serve parity of the face stage: UTKFace test chips pasted into 640x480 scenes, found and aligned again.

    flock /tmp/svertka-bench.lock taskset -c 0 python benchmarks/face_parity.py \
        --model artifacts/utkface_age --data-root $DATASETS_DIR --repeats 3

Each UTKFace test chip (the data module's split) is pasted at a random scale (0.5x-2x), random
position, onto a random background (a crop of one of scikit-image's photos, none with a face,
plus noise) in a 640x480 scene. Side by side in one run:

- baseline: the age model on the chips themselves (what the test step scores);
- ours: the face stage (HOG detection, 5 landmarks, ``get_face_chip`` with the bundle's framing)
  on the scene, then the same model on the chip it cut.

Printed per repeat (a fresh scene seed each): the share of scenes whose face was found (a
detection whose centre lies in the pasted chip), the MAE over found faces, the MAE on the chips
(all of them, and the found ones), their difference; and the time per 640x480 scene of detect +
align (one thread) against the baseline's decode-free preprocess + forward of a chip. A bundle
without a ``faces`` entry is read with ``--size``/``--padding``; ``--framing utkface|padding`` overrides
the bundle's framing, to compare framings on one model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.faces import UTKFACE_POINTS, DetectSettings, FaceAligner, FaceFraming  # noqa: E402
from data.preprocess import load_image  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from serving.predictor import Predictor  # noqa: E402

BACKGROUNDS = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field", "horse", "coins", "moon")
SCENE_W, SCENE_H = 640, 480


def backgrounds() -> list[np.ndarray]:
    """Photos without a face shipped by scikit-image, as RGB uint8 at least 640x480."""
    import cv2
    from skimage import data

    out = []
    for name in BACKGROUNDS:
        img = getattr(data, name)()
        img = (img * 255).astype(np.uint8) if img.dtype == bool else img.astype(np.uint8)
        img = np.dstack([img] * 3) if img.ndim == 2 else img[:, :, :3]
        scale = max(SCENE_W / img.shape[1], SCENE_H / img.shape[0], 1.0)
        if scale > 1:
            img = cv2.resize(img, (round(img.shape[1] * scale) + 1, round(img.shape[0] * scale) + 1))
        out.append(np.ascontiguousarray(img))
    return out


def make_scene(chip: np.ndarray, bgs: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """``chip`` at a random scale (0.5x-2x) and place on a random background: (scene, pasted box)."""
    import cv2

    bg = bgs[rng.integers(len(bgs))]
    y, x = rng.integers(0, bg.shape[0] - SCENE_H + 1), rng.integers(0, bg.shape[1] - SCENE_W + 1)
    scene = bg[y : y + SCENE_H, x : x + SCENE_W].astype(np.int16)
    scene = np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)
    side = round(chip.shape[0] * rng.uniform(0.5, 2.0))
    side = min(side, SCENE_H)
    interp = cv2.INTER_AREA if side < chip.shape[0] else cv2.INTER_LINEAR
    pasted = cv2.resize(chip, (side, side), interpolation=interp)
    px, py = rng.integers(0, SCENE_W - side + 1), rng.integers(0, SCENE_H - side + 1)
    scene[py : py + side, px : px + side] = pasted
    return scene, (px, py, px + side, py + side)


def run(args: argparse.Namespace) -> dict:
    from data.utkface import UTKFaceDataModule

    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    net, meta = load_bundle(args.model)
    if args.framing == "utkface":
        framing = FaceFraming(args.size, points=UTKFACE_POINTS)
    elif args.framing == "padding" or not meta.faces:
        framing = FaceFraming(args.size, args.padding)
    else:
        framing = FaceFraming.from_dict(meta.faces)
    meta.faces = framing.to_dict()
    settings = DetectSettings(min_face=args.min_face, threshold=args.threshold, lone_threshold=args.lone_threshold)
    pred = Predictor((net, meta), device="cpu", face_settings=settings)
    aligner = FaceAligner(framing, settings)

    dm = UTKFaceDataModule(root=args.data_root)
    table = dm.file_table()
    paths = table.loc[table["split"] == "test", "path"].tolist()
    ages = table.loc[table["split"] == "test", "target"].to_numpy(np.float64)
    if args.n:
        paths, ages = paths[: args.n], ages[: args.n]
    chips = [load_image(p, channels=3) for p in paths]
    bgs = backgrounds()

    # baseline: the model on the chips themselves (timed per chip: preprocess + forward)
    t0 = time.perf_counter()
    chip_pred = np.array([float(pred.predict_tensors(pred.prepare(c, detect=False).inputs)[0]) for c in chips])
    chip_ms = (time.perf_counter() - t0) / len(chips) * 1000
    chip_err = np.abs(chip_pred - ages)

    repeats = []
    for r in range(args.repeats):
        rng = np.random.default_rng(args.seed + r)
        found, scene_pred, align_ms, fp = [], [], [], 0
        for chip in chips:
            scene, (x0, y0, x1, y1) = make_scene(chip, bgs, rng)
            t = time.perf_counter()
            faces = aligner(scene)  # detect + landmarks + align, every face in the scene
            align_ms.append((time.perf_counter() - t) * 1000)
            hit = [f for f in faces if x0 <= (f.box[0] + f.box[2]) / 2 <= x1 and y0 <= (f.box[1] + f.box[3]) / 2 <= y1]
            fp += len(faces) - len(hit)
            if hit:
                x = pred.loader.preprocess(hit[0].chip)[None]
                scene_pred.append(float(pred.predict_tensors(x)[0]))
            found.append(bool(hit))
        found = np.array(found)
        scene_err = np.abs(np.array(scene_pred) - ages[found])
        res = {
            "found_rate": float(found.mean()),
            "false_positives": fp,
            "mae_scenes_found": float(scene_err.mean()),
            "mae_chips_all": float(chip_err.mean()),
            "mae_chips_found": float(chip_err[found].mean()),
            "align_ms_median": float(np.median(align_ms)),
            "chip_ms": chip_ms,
        }
        res["mae_diff_vs_all"] = res["mae_scenes_found"] - res["mae_chips_all"]
        res["mae_diff_vs_found"] = res["mae_scenes_found"] - res["mae_chips_found"]
        repeats.append(res)
        print(
            f"repeat {r + 1}: found {res['found_rate']:.2%} ({fp} false positives)"
            f"  MAE scenes {res['mae_scenes_found']:.3f}  chips {res['mae_chips_all']:.3f}"
            f" (found ones {res['mae_chips_found']:.3f})  diff "
            f"{res['mae_diff_vs_all']:+.3f}  detect+align {res['align_ms_median']:.1f} ms/scene vs chip forward "
            f"{chip_ms:.1f} ms (x{res['align_ms_median'] / chip_ms:.1f})",
            flush=True,
        )
    keys = [k for k in repeats[0] if k != "false_positives"]
    summary = {
        k: {"median": statistics.median(r[k] for r in repeats), "min": min(r[k] for r in repeats),
            "max": max(r[k] for r in repeats)}
        for k in keys
    }  # fmt: skip
    return {"n": len(chips), "framing": framing.to_dict(), "settings": dict(settings.__dict__),
            "repeats": repeats, "summary": summary}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a UTKFace age bundle folder")
    p.add_argument("--data-root", default=os.environ.get("DATASETS_DIR"), help="folder holding UTKFace/")
    p.add_argument("--n", type=int, default=0, help="test chips to use (0: the whole test split)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--framing",
        choices=("bundle", "utkface", "padding"),
        default="bundle",
        help="chips cut as the bundle's faces entry says (default), to UTKFace's measured landmark points, "
        "or to dlib's template with --padding",
    )
    p.add_argument("--size", type=int, default=200, help="chip size when not the bundle's")
    p.add_argument("--padding", type=float, default=0.25, help="dlib template padding (--framing padding)")
    p.add_argument("--min-face", type=int, default=DetectSettings.min_face)
    p.add_argument("--threshold", type=float, default=DetectSettings.threshold)
    p.add_argument("--lone-threshold", type=float, default=DetectSettings.lone_threshold)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if not args.data_root:
        print("error: --data-root not given and DATASETS_DIR is not set", file=sys.stderr)
        return 2
    res = run(args)
    s = res["summary"]
    found, ms = s["found_rate"], s["align_ms_median"]
    print(
        f"\n{res['n']} test chips x {args.repeats} repeats (median [min, max]):\n"
        f"  found           {found['median']:.2%} [{found['min']:.2%}, {found['max']:.2%}]  (target >= 97%)\n"
        f"  MAE scenes      {s['mae_scenes_found']['median']:.3f}  chips {s['mae_chips_all']['median']:.3f}"
        f"  diff {s['mae_diff_vs_all']['median']:+.3f} [{s['mae_diff_vs_all']['min']:+.3f}, "
        f"{s['mae_diff_vs_all']['max']:+.3f}]  (target |diff| <= 0.3)\n"
        f"  detect+align    {ms['median']:.1f} ms per 640x480 scene [{ms['min']:.1f}, {ms['max']:.1f}]"
        "  (target <= 60 ms; one thread)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
