"""Per-scene settings of the sidebar (saved with the .blend file): capture and reconstruction options."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty

from .preferences import PRESET_ITEMS


class LSRMSettings(bpy.types.PropertyGroup):
    view_count: IntProperty(name="Views", description="Cameras placed around the object", default=16, min=2, max=256)
    elevation_low: FloatProperty(
        name="Lowest", description="Elevation of the lowest camera", default=-10.0, min=-89.0, max=89.0
    )
    elevation_high: FloatProperty(
        name="Highest", description="Elevation of the highest camera", default=60.0, min=-89.0, max=89.0
    )
    resolution: IntProperty(name="Resolution", description="Width and height of each view", default=256, min=16)
    samples: IntProperty(name="Samples", description="Cycles samples per view", default=32, min=1, max=4096)
    use_world: BoolProperty(
        name="World as lighting",
        description="Send the world's environment texture as the known lighting of the views",
        default=True,
    )
    camera_collection: PointerProperty(
        name="Cameras", type=bpy.types.Collection, description="Collection of cameras with their photos"
    )
    preset: EnumProperty(
        name="Preset",
        items=[("PREFERENCES", "Default", "the preset chosen in the add-on's preferences"), *PRESET_ITEMS[1:]],
        default="PREFERENCES",
    )
    engine: EnumProperty(
        name="Engine",
        items=[
            ("PRESET", "Preset's", "the engine the preset uses"),
            ("refine", "Refine", "test-time optimisation against the views"),
            ("feedforward", "Feed-forward", "the LSRM model alone (needs a model on the backend)"),
            ("both", "Both", "the model's result, then refined"),
        ],
        default="PRESET",
    )
    texture_size: EnumProperty(
        name="Texture",
        items=[("PRESET", "Preset's", "")] + [(str(size), f"{size} px", "") for size in (256, 512, 1024, 2048, 4096)],
        default="PRESET",
    )
    target_faces: IntProperty(
        name="Faces", description="Faces of the result; 0: the preset's", default=0, min=0, soft_max=500_000
    )

    def job_fields(self, default_preset: str) -> dict[str, str]:
        """The form fields of a job request (only those set here; the service fills in the rest)."""
        preset = default_preset if self.preset == "PREFERENCES" else self.preset
        fields = {"preset": preset, "engine": self.engine, "texture_size": self.texture_size}
        fields = {name: value for name, value in fields.items() if value not in ("SERVICE", "PRESET")}
        if self.target_faces:
            fields["target_faces"] = str(self.target_faces)
        return fields
