"""Pack a few megabytes of SweetHome3D furniture for a GPU machine that has no Debian package.

    python scripts/pack_furniture.py --out .gpu/furniture --megabytes 6

The full archives are 25 MB each (mostly OBJ text), too much to travel beside a checkpoint in the
device's 64 MiB working tree. This writes archives of the same names (so `--furniture-dir` reads
them like the originals) holding the smallest models of each, LZMA-compressed, textures re-encoded
as JPEG no larger than the 512 px `backend.data.furniture` reads anyway. The development set's
models stay out, as they do in training.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.furniture import ARCHIVES, FURNITURE_DIR, devset_models

TEXTURE_SIZE = 512
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def model_files(archive: zipfile.ZipFile, model: str) -> list[str]:
    """The OBJ, its MTL libraries and their textures: every file in the model's folder that training reads."""
    folder = str(PurePosixPath(model).parent) + "/"
    return [
        name
        for name in archive.namelist()
        if name.startswith(folder) and name.lower().endswith((".obj", ".mtl", *IMAGE_SUFFIXES))
    ]


def small_texture(data: bytes) -> bytes:
    """An image as a JPEG of at most TEXTURE_SIZE pixels a side (the reader opens images by content)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((TEXTURE_SIZE, TEXTURE_SIZE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=88)
    return out.getvalue()


def pack(source: Path, target: Path, budget: int) -> int:
    """Write the smallest models of `source` into `target` until `budget` compressed bytes; the model count."""
    held_out = devset_models()
    with zipfile.ZipFile(source) as archive:
        sizes = {info.filename: info.compress_size for info in archive.infolist()}
        models = [n for n in archive.namelist() if n.lower().endswith(".obj") and n not in held_out]
        models.sort(key=lambda model: sum(sizes[name] for name in model_files(archive, model)))
        count = 0
        with zipfile.ZipFile(target, "w", zipfile.ZIP_LZMA) as packed:
            for name in ("LICENSE.TXT",):
                if name in sizes:
                    packed.writestr(name, archive.read(name))
            for model in models:
                for name in model_files(archive, model):
                    data = archive.read(name)
                    packed.writestr(name, small_texture(data) if name.lower().endswith(IMAGE_SUFFIXES) else data)
                packed.fp.flush()
                count += 1
                if target.stat().st_size >= budget:
                    break
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the packed archives")
    parser.add_argument("--megabytes", type=float, default=6.0, help="total size of all packed archives")
    parser.add_argument("--source", type=Path, default=FURNITURE_DIR, help="folder of the original archives")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = int(args.megabytes * 1e6 / len(ARCHIVES))
    for name in ARCHIVES:
        count = pack(args.source / name, args.out / name, budget)
        print(f"{args.out / name}: {count} models, {(args.out / name).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
