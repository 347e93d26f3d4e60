"""The sidebar tab (3D Viewport > N > LSRM): Backend, Input and Reconstruct. Drawing only reads state."""

from __future__ import annotations

import bpy

from .preferences import preferences
from .session import ERROR, FAILED, READY, RUNNING, SESSION, STARTING, STOPPED

MAX_WARNINGS = 4  # more are summed up in one line
STATE_ICONS = {STOPPED: "RADIOBUT_OFF", STARTING: "SORTTIME", READY: "CHECKMARK", ERROR: "ERROR"}


class _Sidebar:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "LSRM"


class LSRM_PT_backend(_Sidebar, bpy.types.Panel):
    bl_label = "Backend"

    def draw(self, context) -> None:
        layout = self.layout
        prefs = preferences(context)
        layout.row().prop(prefs, "backend", expand=True)
        state = SESSION.backend
        column = layout.column(align=True)
        column.label(text=state.capitalize(), icon=STATE_ICONS[state])
        if SESSION.backend_message:
            wrapped_label(column, SESSION.backend_message, context, alert=state == ERROR)
        if prefs.backend == "LOCAL":
            if SESSION.local is None:
                layout.operator("lsrm.start_backend", icon="PLAY")
            else:
                layout.operator("lsrm.stop_backend", icon="SNAP_FACE")
        else:
            layout.label(text=prefs.url, icon="URL")
            layout.operator("lsrm.connect", icon="LINKED")


class LSRM_PT_input(_Sidebar, bpy.types.Panel):
    bl_label = "Input"

    def draw(self, context) -> None:
        layout = self.layout
        settings = context.scene.lsrm
        box = layout.box()
        column = box.column(align=True)
        column.prop(settings, "view_count")
        row = column.row(align=True)
        row.prop(settings, "elevation_low")
        row.prop(settings, "elevation_high")
        column.prop(settings, "resolution")
        column.prop(settings, "samples")
        box.prop(settings, "use_world")
        box.operator("lsrm.capture_selected", icon="RESTRICT_RENDER_OFF")
        box = layout.box()
        box.prop(settings, "camera_collection")
        box.operator("lsrm.use_collection", icon="OUTLINER_COLLECTION")

        views = SESSION.views
        if SESSION.views_message:
            wrapped_label(layout, SESSION.views_message, context, alert=True)
        elif views is not None:
            icon = "CHECKMARK" if views.count >= 2 else "ERROR"
            layout.label(text=f"{views.count} views of '{views.source}' ready", icon=icon)
        if views is not None:
            for warning in views.warnings[:MAX_WARNINGS]:
                wrapped_label(layout, warning, context, icon="ERROR")
            if len(views.warnings) > MAX_WARNINGS:
                layout.label(text=f"and {len(views.warnings) - MAX_WARNINGS} more warnings (see the Info editor)")


class LSRM_PT_reconstruct(_Sidebar, bpy.types.Panel):
    bl_label = "Reconstruct"

    def draw(self, context) -> None:
        layout = self.layout
        settings = context.scene.lsrm
        column = layout.column(align=True)
        column.enabled = SESSION.job != RUNNING
        for name in ("preset", "engine", "texture_size", "target_faces"):
            column.prop(settings, name)
        if SESSION.job == RUNNING:
            layout.operator("lsrm.cancel", icon="CANCEL")
            stage = SESSION.stage or "waiting"
            layout.progress(factor=SESSION.progress, type="BAR", text=f"{stage} {SESSION.progress:.0%}")
        else:
            row = layout.row()
            row.enabled = SESSION.backend == READY and SESSION.views is not None and SESSION.views.count >= 2
            row.operator("lsrm.reconstruct", icon="MESH_MONKEY")
        if SESSION.job_message:
            icon = "ERROR" if SESSION.job == FAILED else "INFO"
            wrapped_label(layout, SESSION.job_message, context, icon=icon, alert=SESSION.job == FAILED)


def wrapped_label(layout, text: str, context, icon: str = "NONE", alert: bool = False) -> None:
    """A long line broken into labels that fit the sidebar's width."""
    width = max(20, int(getattr(context.region, "width", 300) / 7))  # ~7 px per character at the default UI scale
    column = layout.column(align=True)
    column.alert = alert
    words, line, first = text.split(), "", True
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            column.label(text=line, icon=icon if first else "BLANK1")
            line, first = word, False
        else:
            line = f"{line} {word}" if line else word
    if line:
        column.label(text=line, icon=icon if first else "BLANK1")


CLASSES = (LSRM_PT_backend, LSRM_PT_input, LSRM_PT_reconstruct)
