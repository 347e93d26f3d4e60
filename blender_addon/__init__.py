"""LSRM for Blender: the add-on side (runs inside Blender; stdlib + bpy only, never torch or backend/).

Modules: `preferences` (how to reach a backend), `properties` (per-scene options), `panels` (the
sidebar tab), `operators`, `client` (the HTTP API), `local_backend` (the bundled backend as a child
process), `tasks` (worker threads + timers), `session` (run-time state), `capture` (scene -> bundle),
`results` (GLB -> scene). Register and unregister leave nothing behind: classes, the scene
property, timers and the child process all go.
"""

from __future__ import annotations

import atexit

import bpy

from . import local_backend, operators, panels, preferences, properties, session, tasks

CLASSES = (preferences.LSRMPreferences, properties.LSRMSettings, *operators.CLASSES, *panels.CLASSES)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.lsrm = bpy.props.PointerProperty(type=properties.LSRMSettings)
    atexit.register(local_backend.stop_all)  # the child ends with Blender


def unregister() -> None:
    tasks.stop_all()
    local_backend.stop_all()
    atexit.unregister(local_backend.stop_all)
    session.reset()
    del bpy.types.Scene.lsrm
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
