"""The add-on's preferences: how to reach a backend, the default preset, where results go."""

from __future__ import annotations

import tempfile
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

PRESETS = ("cpu", "fast", "standard", "high")  # the backend's presets (`python -m backend serve` checks the name)
PRESET_ITEMS = [
    ("SERVICE", "Backend's default", "standard on a GPU, cpu without one"),
    ("cpu", "CPU", "a small reconstruction that finishes in minutes on a CPU"),
    ("fast", "Fast", "feed-forward only with a model; else the shortest refinement (about 10 s on a GPU)"),
    ("standard", "Standard", "feed-forward and a refinement (about 40 s on a GPU)"),
    ("high", "High", "standard's refinement with a finer mesh and 4K textures"),
]


class LSRMPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend: EnumProperty(
        name="Backend",
        items=[
            ("LOCAL", "Local", "start the bundled backend with a Python that has PyTorch"),
            ("REMOTE", "Remote", "connect to a running backend service by URL"),
        ],
        default="LOCAL",
    )
    python: StringProperty(
        name="Python",
        description="Python executable with PyTorch for the bundled backend; empty: find one",
        subtype="FILE_PATH",
    )
    device: EnumProperty(
        name="Device",
        items=[(name, name.upper() if name != "auto" else "Auto", "") for name in ("auto", "cuda", "mps", "cpu")],
        default="auto",
    )
    url: StringProperty(
        name="URL", description="Base URL of a running backend service", default="http://127.0.0.1:8765"
    )
    token: StringProperty(name="Token", description="Contents of the service's token file", subtype="PASSWORD")
    default_preset: EnumProperty(name="Default preset", items=PRESET_ITEMS, default="SERVICE")
    output: StringProperty(
        name="Results",
        description="Folder for captured views and results; empty: the system's temporary folder",
        subtype="DIR_PATH",
    )

    def draw(self, context) -> None:
        from .session import SESSION

        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "backend", expand=True)
        if self.backend == "LOCAL":
            layout.prop(self, "python")
            layout.prop(self, "device")
            row = layout.row()
            row.operator("lsrm.check_python", icon="CONSOLE")
            if SESSION.python_report:
                row.label(text=SESSION.python_report)
        else:
            layout.prop(self, "url")
            layout.prop(self, "token")
        layout.prop(self, "default_preset")
        layout.prop(self, "output")


def preferences(context=None) -> LSRMPreferences:
    return (context or bpy.context).preferences.addons[__package__].preferences


def output_folder(context=None) -> Path:
    """Where captured views and results go (made on first use)."""
    chosen = preferences(context).output
    folder = Path(bpy.path.abspath(chosen)) if chosen else Path(tempfile.gettempdir()) / "lsrm-blender"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
