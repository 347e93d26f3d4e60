"""The one OpenEXR reader: bundles' ground-truth buffers, environment maps, Cycles renders, the demo's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenEXR

from .errors import InputError


def read_exr(path: Path | str, what: str = "the EXR") -> dict[str, np.ndarray]:
    """Every channel of an EXR as float32 [H, W], keyed by its upper-case name without layer prefix ('R', 'A', 'Y').

    Channels keep the file's order. A file that cannot be read is an InputError that names `what`.
    """
    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            return {
                name.split(".")[-1].upper(): np.asarray(channel.pixels, dtype=np.float32)
                for name, channel in exr.channels().items()
            }
    except Exception as error:  # the EXR library raises assorted exception types on corrupt files
        raise InputError(f"cannot read {what} '{Path(path).name}' ({error}); rewrite the file") from None


def stack_channels(channels: dict[str, np.ndarray], names: str) -> np.ndarray | None:
    """The named channels stacked last ([H, W, len(names)]), or None when one of them is missing."""
    if not all(name in channels for name in names):
        return None
    return np.stack([channels[name] for name in names], axis=-1)


def read_exr_rgba(path: Path | str, what: str = "the EXR") -> np.ndarray:
    """A linear RGBA EXR (a Cycles render) as float32 [H, W, 4]."""
    rgba = stack_channels(read_exr(path, what), "RGBA")
    if rgba is None:
        raise InputError(f"{what} '{Path(path).name}' has no R, G, B and A channels; render it as RGBA")
    return rgba
