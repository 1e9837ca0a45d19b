"""Build offline out-of-distribution (OOD) test sets for ``protohead evaluate RUN --ood DIR`` / ``bench_ood.py``.

    .venv/bin/python benchmarks/ood_sets.py /tmp/ood-sets [--per-set 50] [--per-photo 60] [--ham-images 100]

Nothing is downloaded: every image is generated, or read from files that installed packages ship, or from the
shared HAM10000 copy. Write into a scratch folder (``/tmp``), never into the repository — the covariate sets
are derived from HAM10000 images. Layout (one folder per set; ``manifest.json`` describes each)::

    OUT/synthetic/{uniform_noise,gaussian_noise,constant_colour,gradient,checkerboard}/*.png   (224×224)
    OUT/natural/photos/*.png     random crops / flips of the photographs found (see NATURAL_PHOTOS)
    OUT/natural/graphics/*.png   random crops / flips of logos, icons and plots shipped as package data
    OUT/natural/mri/*.png        random crops / flips of matplotlib's MRI slice (s1045.ima.gz)
    OUT/covariate/{blur,noise,jpeg5,contrast01}/*   corrupted HAM10000 *test* images (covariate shift: still
                                                    lesions, so report them apart from the far-OOD sets)

The natural sets are *augmented*: few originals (three photographs), many crops, so their samples are
correlated; file names say which original and which crop/flip each one is (``china_017_flip.png``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

SIZE = 224
SYNTHETIC = ("uniform_noise", "gaussian_noise", "constant_colour", "gradient", "checkerboard")
CORRUPTIONS = ("blur", "noise", "jpeg5", "contrast01")
DEFAULT_HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"


def _site_file(module: str, *parts: str) -> Path | None:
    """A data file inside an installed package, or None when the package or file is absent."""
    try:
        package = __import__(module)
    except ImportError:
        return None
    path = Path(package.__file__).parent.joinpath(*parts)
    return path if path.is_file() else None


def natural_sources() -> dict[str, dict[str, Path]]:
    """Non-dermoscopy images shipped inside installed packages, by set: {"photos": {name: path}, ...}.

    Looked for (present ones are used, absent ones skipped): matplotlib ``mpl-data/sample_data``
    (grace_hopper.jpg photograph; logo2.png, Minduka_Present_Blue_Pack.png graphics; s1045.ima.gz MRI),
    scikit-learn ``datasets/images`` (china.jpg, flower.jpg photographs), scikit-image ``data`` (its
    photographs, if installed), Pillow's test images (not shipped in wheels), networkx / sympy test
    baselines (plots).
    """
    photos = {
        "grace_hopper": _site_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
        "china": _site_file("sklearn", "datasets", "images", "china.jpg"),
        "flower": _site_file("sklearn", "datasets", "images", "flower.jpg"),
    }
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"):
        photos[f"skimage_{Path(name).stem}"] = _site_file("skimage", "data", name)
    pil_test = _site_file("PIL", "..", "Tests", "images", "hopper.jpg")
    photos["pil_hopper"] = pil_test
    graphics: dict[str, Path | None] = {
        "mpl_logo": _site_file("matplotlib", "mpl-data", "sample_data", "logo2.png"),
        "mpl_icon": _site_file("matplotlib", "mpl-data", "sample_data", "Minduka_Present_Blue_Pack.png"),
    }
    for module, folder in (("networkx", ("drawing", "tests", "baseline")), ("sympy", ("plotting", "tests"))):
        try:
            root = Path(__import__(module).__file__).parent.joinpath(*folder)
        except ImportError:
            continue
        for path in sorted(root.glob("*.png")) if root.is_dir() else []:
            graphics[f"{module}_{path.stem}"] = path
    mri = {"mpl_mri": _site_file("matplotlib", "mpl-data", "sample_data", "s1045.ima.gz")}
    return {name: {k: v for k, v in found.items() if v is not None}
            for name, found in (("photos", photos), ("graphics", graphics), ("mri", mri))}


def read_source(path: Path) -> Image.Image:
    """An RGB PIL image of a source file (the MRI: 256×256 big-endian uint16, scaled to 8 bits)."""
    if path.name.endswith(".ima.gz"):
        raw = np.frombuffer(gzip.decompress(path.read_bytes()), ">u2").reshape(256, 256).astype(np.float64)
        gray = np.round(255 * raw / max(raw.max(), 1)).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def random_crop_flip(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A random crop (25–100 % of the area, aspect 3/4–4/3), flipped half the time, resized to SIZE²."""
    width, height = image.size
    for _ in range(20):
        area = rng.uniform(0.25, 1.0) * width * height
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        w, h = width, height
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
    if rng.random() < 0.5:
        return crop.transpose(Image.FLIP_LEFT_RIGHT), "_flip"
    return crop, ""


def synthetic_images(kind: str, count: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``count`` (SIZE, SIZE, 3) uint8 images of one synthetic kind."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    for _ in range(count):
        if kind == "uniform_noise":
            yield rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        elif kind == "gaussian_noise":
            mean = rng.uniform(60, 200, size=3)
            yield np.clip(rng.normal(mean, rng.uniform(10, 60), (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        elif kind == "constant_colour":
            yield np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (SIZE, SIZE, 3)).copy()
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            t = np.cos(angle) * xx + np.sin(angle) * yy
            t = (t - t.min()) / (t.max() - t.min())
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            yield np.round(a + (b - a) * t[..., None]).astype(np.uint8)
        elif kind == "checkerboard":
            cell = int(rng.integers(4, 57))
            board = ((np.arange(SIZE)[:, None] // cell + np.arange(SIZE)[None, :] // cell) % 2).astype(bool)
            a, b = rng.integers(0, 256, 3, dtype=np.uint8), rng.integers(0, 256, 3, dtype=np.uint8)
            yield np.where(board[..., None], a, b).astype(np.uint8)
        else:
            raise ValueError(f"unknown synthetic kind {kind!r}")


def corrupt(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A corrupted copy of a HAM10000 image and the file suffix to save it with."""
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=6)), ".png"
    if kind == "noise":
        array = np.asarray(image, dtype=np.float64) + rng.normal(0, 80, (image.height, image.width, 3))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), ".png"
    if kind == "jpeg5":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=5)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), ".jpg"
    if kind == "contrast01":
        return ImageEnhance.Contrast(image).enhance(0.1), ".png"
    raise ValueError(f"unknown corruption {kind!r}")


def _save(image: Image.Image, path: Path, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.save(path, quality=quality or 95)
    else:
        image.save(path)


def build(out: Path, per_set: int = 50, per_photo: int = 60, graphics_total: int = 50, mri_total: int = 50,
          ham: Path | None = None, ham_images: int = 100, seed: int = 0,
          log: Callable[[str], None] = print) -> dict[str, dict]:
    """Write every set under ``out`` and ``out/manifest.json``; returns the manifest (set → description)."""
    repo = Path(__file__).resolve().parents[1]
    if out.resolve().is_relative_to(repo):
        raise SystemExit(f"refusing to write OOD sets inside the repository ({out}); use /tmp")
    rng = np.random.default_rng(seed)
    manifest: dict[str, dict] = {}
    for kind in SYNTHETIC:
        folder = out / "synthetic" / kind
        for i, array in enumerate(synthetic_images(kind, per_set, rng)):
            _save(Image.fromarray(array), folder / f"{kind}_{i:03d}.png")
        manifest[f"synthetic/{kind}"] = {"group": "far-OOD synthetic", "count": per_set,
                                         "source": f"generated, {SIZE}×{SIZE}, seed {seed}"}
    sources = natural_sources()
    for set_name, found in sources.items():
        if not found:
            log(f"natural/{set_name}: no source image found, set skipped")
            continue
        images = {name: read_source(path) for name, path in found.items()}
        total = per_photo * len(images) if set_name == "photos" else graphics_total if set_name == "graphics" \
            else mri_total
        names = sorted(images)
        counts = {name: total // len(names) + (k < total % len(names)) for k, name in enumerate(names)}
        folder = out / "natural" / set_name
        for name in names:
            for i in range(counts[name]):
                crop, flip = random_crop_flip(images[name], rng)
                _save(crop, folder / f"{name}_{i:03d}{flip}.png")
        manifest[f"natural/{set_name}"] = {
            "group": "far-OOD natural", "count": sum(counts.values()),
            "source": {name: str(found[name]) for name in names},
            "augmentation": "random crop 25-100% area, aspect 3/4-4/3, horizontal flip p=0.5, resized to "
                            f"{SIZE}×{SIZE}; {len(names)} original(s), so samples are correlated"}
    if ham is not None:
        from protohead.data import load_ham10000

        test = load_ham10000(ham).splits["test"]
        chosen = np.sort(rng.choice(len(test), size=min(ham_images, len(test)), replace=False))
        for kind in CORRUPTIONS:
            for i in chosen.tolist():
                image, suffix = corrupt(Image.fromarray(test.load(i)), kind, rng)
                _save(image, out / "covariate" / kind / f"{test.ids[i]}{suffix}", quality=95)
            manifest[f"covariate/{kind}"] = {
                "group": "covariate shift (HAM10000 test images, corrupted)", "count": len(chosen),
                "source": f"{ham} test split, {len(chosen)} images drawn with seed {seed}",
                "corruption": {"blur": "Gaussian blur radius 6 px", "noise": "additive Gaussian noise σ=80",
                               "jpeg5": "JPEG quality 5", "contrast01": "contrast × 0.1"}[kind]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (in /tmp, never the repository)")
    parser.add_argument("--per-set", type=int, default=50, help="images per synthetic set")
    parser.add_argument("--per-photo", type=int, default=60, help="crops per natural photograph")
    parser.add_argument("--graphics", type=int, default=50, help="crops over all graphics")
    parser.add_argument("--mri", type=int, default=50, help="crops of the MRI slice")
    parser.add_argument("--ham", default=str(DEFAULT_HAM),
                        help="HAM10000 folder for the covariate sets ('' to skip them)")
    parser.add_argument("--ham-images", type=int, default=100, help="test images per corruption")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ham = Path(args.ham) if args.ham and Path(args.ham).is_dir() else None
    if ham is None:
        print(f"no HAM10000 at {args.ham}: covariate sets skipped", file=sys.stderr)
    manifest = build(args.out, args.per_set, args.per_photo, args.graphics, args.mri, ham, args.ham_images, args.seed)
    for name, entry in manifest.items():
        print(f"{name:28s} {entry['count']:4d}  {entry['group']}")


if __name__ == "__main__":
    main()
