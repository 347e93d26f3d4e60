"""Checkpoints: safetensors only (never pickle), the model config in the metadata, strict validation.

A checkpoint is one `.safetensors` file whose metadata holds `format` (= FORMAT), `version`, the
`ModelConfig` as JSON and free-form notes (how it was trained). Loading checks every name and shape
against the model the config describes and says in one sentence what is wrong with a bad file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..errors import InputError
from .config import ModelConfig
from .lsrm import LSRM

FORMAT = "lsrm-checkpoint"
VERSION = "1"


class CheckpointError(InputError):
    """A checkpoint file that cannot be used, with a sentence saying why."""


def save_checkpoint(
    model: LSRM, path: Path | str, *, dtype: torch.dtype | None = None, notes: dict[str, str] | None = None
) -> Path:
    """Write the model's weights (floating ones cast to `dtype` when given, e.g. bf16 to ship) atomically."""
    path = Path(path)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    metadata = {"format": FORMAT, "version": VERSION, "config": model.config.to_json()}
    metadata.update({f"note.{key}": str(value) for key, value in (notes or {}).items()})
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def read_metadata(path: Path | str) -> dict[str, str]:
    """The checkpoint's metadata, after checking that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass the path of a .safetensors file.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint '{path}' is not a readable safetensors file ({error}); it may be truncated, so download "
            "or copy it again."
        ) from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"'{path}' is a safetensors file but not an LSRM checkpoint (no '{FORMAT}' metadata).")
    if metadata.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {metadata.get('version')}; this backend reads version {VERSION}."
        )
    return metadata


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> LSRM:
    """The model a checkpoint describes, with its weights, in float32 on `device`, in eval mode."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        config = ModelConfig.from_json(metadata["config"])
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint '{path}' has an invalid model config: {error}.") from None
    model = LSRM(config)
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint '{path}' does not match its config: {_listing('missing', missing)}"
                    f"{'; ' if missing and unexpected else ''}{_listing('unexpected', unexpected)}."
                )
            state = {}
            for name in sorted(names):
                tensor = handle.get_tensor(name)
                if tensor.shape != expected[name].shape:
                    raise CheckpointError(
                        f"checkpoint '{path}': '{name}' has shape {tuple(tensor.shape)} but the config needs "
                        f"{tuple(expected[name].shape)}."
                    )
                state[name] = tensor.to(expected[name].dtype)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint '{path}' could not be read ({error}); it may be truncated.") from None
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise CheckpointError(f"checkpoint '{path}' holds non-finite weights; it is damaged.")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _listing(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{kind} {shown}"


def save_optimizer(optimizer: torch.optim.Optimizer, names: list[str], path: Path | str) -> Path:
    """The optimizer's state without pickle: tensors in a safetensors file, everything else in its metadata.

    `names` are the parameter names in the optimizer's order, so the state maps back by name on load.
    """
    path = Path(path)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{names[index]}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{names[index]}/{key}"] = value
    metadata = {
        "format": "lsrm-optimizer",
        "names": json.dumps(names),
        "groups": json.dumps(state["param_groups"]),  # hyperparameters and parameter indices: plain JSON
        "scalars": json.dumps(scalars),
    }
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], path: Path | str) -> None:
    """Restore what `save_optimizer` wrote into an optimizer over the same named parameters."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"optimizer state '{path}' could not be read ({error}); start without it.") from None
    if metadata.get("format") != "lsrm-optimizer":
        raise CheckpointError(f"'{path}' is not an optimizer state written by training.")
    saved = json.loads(metadata["names"])
    if saved != names:
        raise CheckpointError(f"optimizer state '{path}' is for other parameters than this model's trainable ones.")
    device = optimizer.param_groups[0]["params"][0].device
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        # Adam's step counter stays on the CPU unless the optimizer was made capturable.
        state.setdefault(names.index(name), {})[field] = value if field == "step" else value.to(device)
    for key, value in json.loads(metadata["scalars"]).items():
        name, field = key.rsplit("/", 1)
        state.setdefault(names.index(name), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["groups"])})
