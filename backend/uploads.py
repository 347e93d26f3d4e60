"""Uploaded bundles: a zip of the bundle folder, unpacked safely and validated before any GPU work.

The service never trusts an archive: every entry name is checked (relative, no `..`, no backslash
or characters a file system may treat specially), symlinks, encrypted entries and files that are not
part of a bundle are refused, and sizes are bounded three ways (the declared total, each entry's
compression ratio, and the bytes actually written), so a zip bomb stops before it fills the disk.
Only regular files are ever created, each with exclusive-create, inside the destination folder.
Then the bundle goes through `load_bundle`, the same validation the command line uses, and its
environment map's header is checked before the map is decoded. Every refusal is an `InputError`
with one sentence that names the entry and says what to fix; paths in it are relative to the bundle.
"""

from __future__ import annotations

import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .bundle import TRANSFORMS, Bundle, load_bundle
from .errors import InputError
from .reconstruct import MIN_VIEWS

MIB = 1 << 20
# What a bundle may hold: its transforms.json, images and masks, ground-truth buffers, environment maps.
BUNDLE_SUFFIXES = (".json", ".png", ".jpg", ".jpeg", ".exr", ".hdr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".exr", ".hdr")
# Metadata that archivers add on their own (Finder, Explorer): skipped, not refused.
ARCHIVER_LITTER = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")
# Below this size an entry's compression ratio is not checked: small JSON compresses well and is harmless.
RATIO_FLOOR = MIB
# Characters Windows file systems give a meaning (':' opens an alternate data stream) and control characters.
_UNSAFE_NAME = re.compile(r'[\\:*?"<>|\x00-\x1f]')
_COPY_CHUNK = MIB


@dataclass(frozen=True)
class UploadLimits:
    """What one submitted bundle may spend; the service's command line sets each of these."""

    request_bytes: int = 512 * MIB  # the whole HTTP request body
    unpacked_bytes: int = 2048 * MIB  # all archive entries together, uncompressed
    entries: int = 4096  # archive entries (files and folders)
    compression_ratio: float = 100.0  # uncompressed / compressed size of one entry above RATIO_FLOOR
    image_bytes: int = 64 * MIB  # one image, mask or environment file, uncompressed
    image_pixels: int = 4096 * 4096  # one image's width x height (environment maps included)
    views: int = 512  # frames in transforms.json


def unpack_bundle(archive: BinaryIO, destination: Path, limits: UploadLimits) -> Path:
    """Unpack a zipped bundle into the empty folder `destination`; returns the folder holding transforms.json.

    The archive holds either transforms.json and its images at the top, or one folder that does
    (what zipping the bundle folder gives). Raises InputError before writing anything when the
    archive's directory is unacceptable, and while writing when an entry's data is; the caller
    removes `destination` on error.
    """
    try:
        with zipfile.ZipFile(archive) as zipped:
            files = _checked_entries(zipped, limits)
            root = _bundle_root([info.filename for info in files])
            written = 0
            for info in files:
                written += _extract(zipped, info, destination, limits, written)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise InputError(
            f"the 'bundle' archive is not a readable zip file ({error}); zip the bundle folder again and resend it."
        ) from None
    except NotImplementedError:
        raise InputError(
            "the 'bundle' archive uses a compression method this service cannot read; zip it with the standard "
            "'deflate' method (the default of most tools)."
        ) from None
    return destination / root


def _checked_entries(zipped: zipfile.ZipFile, limits: UploadLimits) -> list[zipfile.ZipInfo]:
    """The archive's file entries to extract, after every check that needs no decompression."""
    entries = zipped.infolist()
    if len(entries) > limits.entries:
        raise InputError(
            f"the archive has {len(entries)} entries, over the limit of {limits.entries}; send only the bundle's "
            "transforms.json and the files it names."
        )
    files, declared = [], 0
    for info in entries:
        name = info.filename
        _check_name(name)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"archive entry '{name}' is a symbolic link; put the file itself in the archive.")
        if info.is_dir() or _is_litter(name):
            continue
        if info.flag_bits & 0x1:
            raise InputError(f"archive entry '{name}' is encrypted; zip the bundle without a password.")
        suffix = Path(name).suffix.lower()
        if suffix not in BUNDLE_SUFFIXES:
            raise InputError(
                f"archive entry '{name}' is not part of a bundle (allowed: {', '.join(BUNDLE_SUFFIXES)}); remove it "
                "from the archive."
            )
        if suffix in IMAGE_SUFFIXES and info.file_size > limits.image_bytes:
            raise InputError(
                f"image '{name}' is {info.file_size / MIB:.1f} MiB, over the limit of {limits.image_bytes / MIB:g} MiB "
                "per image; downscale it or save it with compression."
            )
        if info.file_size > RATIO_FLOOR and info.file_size > limits.compression_ratio * max(info.compress_size, 1):
            raise InputError(
                f"archive entry '{name}' expands {info.file_size / max(info.compress_size, 1):.0f} times (limit "
                f"{limits.compression_ratio:g}), which is what a zip bomb does; send the bundle's real files."
            )
        declared += info.file_size
        files.append(info)
    if declared > limits.unpacked_bytes:
        raise InputError(
            f"the archive unpacks to {declared / MIB:.0f} MiB, over the limit of {limits.unpacked_bytes / MIB:g} MiB; "
            "send fewer or smaller images."
        )
    return files


def _check_name(name: str) -> None:
    """Refuse entry names that could land outside the destination or mean something special on some system."""
    if _UNSAFE_NAME.search(name):
        raise InputError(
            f'archive entry {name!r} contains a backslash, a control character or one of : * ? " < > |; name '
            "files with letters, digits, '-', '_' and '.', separated by '/'."
        )
    if name.startswith("/"):
        raise InputError(f"archive entry '{name}' is an absolute path; zip the bundle with relative paths.")
    parts = name.removesuffix("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InputError(
            f"archive entry '{name}' has an empty, '.' or '..' path part; zip the bundle folder with plain "
            "relative paths."
        )


def _is_litter(name: str) -> bool:
    parts = name.split("/")
    return parts[0] == ARCHIVER_LITTER[0] or parts[-1] in ARCHIVER_LITTER or parts[-1].startswith("._")


def _bundle_root(names: list[str]) -> str:
    """Where transforms.json is: the archive's top, or its single top-level folder."""
    if TRANSFORMS in names:
        return "."
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{TRANSFORMS}" in names:
        return next(iter(tops))
    raise InputError(
        f"the archive has no {TRANSFORMS} at its top or in its one top-level folder; zip the bundle folder itself "
        f"(the one that holds {TRANSFORMS} and the images)."
    )


def _extract(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path, limits: UploadLimits, done: int) -> int:
    """Copy one entry to a new regular file, counting real bytes against the limits; returns the bytes written."""
    target = destination.joinpath(*info.filename.split("/"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zipped.open(info) as source, open(target, "xb") as sink:
            while chunk := source.read(_COPY_CHUNK):
                written += len(chunk)
                # Never trust the sizes in the archive's directory: count what is actually unpacked.
                if written > info.file_size or done + written > limits.unpacked_bytes:
                    raise InputError(
                        f"archive entry '{info.filename}' unpacks to more than its stated size or past the limit of "
                        f"{limits.unpacked_bytes / MIB:g} MiB; send the bundle's real files."
                    )
                sink.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise InputError(
            f"archive entry '{info.filename}' appears twice or collides with a folder of the same name (names may "
            "differ only in letter case); give every file its own name."
        ) from None
    return written


def validate_bundle(folder: Path, limits: UploadLimits) -> Bundle:
    """Load and check an unpacked bundle with the command line's loader; messages name files relative to it."""
    try:
        bundle = load_bundle(folder, max_views=limits.views, max_image_pixels=limits.image_pixels)
        if len(bundle.names) < MIN_VIEWS:
            raise InputError(
                f"the bundle has {len(bundle.names)} view; a surface needs at least {MIN_VIEWS} views from "
                "different directions, so capture more views around the object."
            )
        if bundle.environment is not None:
            _check_environment_size(bundle.environment.path, limits.image_pixels)
            from .shading import read_environment_image

            read_environment_image(bundle.environment.path)
    except InputError as error:
        raise InputError(_relative(str(error), folder)) from None
    return bundle


def _check_environment_size(path: Path, max_pixels: int) -> None:
    """Read only the header of an environment map and refuse one too large to decode."""
    width, height = _environment_size(path)
    if width * height > max_pixels:
        raise InputError(
            f"environment map '{path.name}' is {width}x{height}, over the limit of {max_pixels} pixels; downscale it."
        )


def _environment_size(path: Path) -> tuple[int, int]:
    if path.suffix.lower() == ".exr":
        import OpenEXR

        try:
            low, high = OpenEXR.File(str(path), header_only=True).header()["dataWindow"]
        except Exception as error:  # the EXR library reports corrupt files with assorted exception types
            raise InputError(f"environment map '{path.name}' cannot be read ({error}); re-export it.") from None
        return int(high[0] - low[0] + 1), int(high[1] - low[1] + 1)
    # Radiance .hdr: text header lines, a blank line, then the resolution line "-Y <height> +X <width>".
    with open(path, "rb") as file:
        head = file.read(64 * 1024)
    found = re.search(rb"\n\n[-+]Y (\d+) [-+]X (\d+)\s*\n", head)
    if found is None:
        raise InputError(f"environment map '{path.name}' has no Radiance resolution line; re-export it.")
    return int(found.group(2)), int(found.group(1))


def _relative(message: str, folder: Path) -> str:
    """The message with the server's own paths to the bundle removed (clients know only their bundle)."""
    for prefix in {str(folder.resolve()), str(folder)}:
        message = message.replace(prefix + "/", "").replace(prefix + "\\", "").replace(prefix, "the bundle")
    return message
