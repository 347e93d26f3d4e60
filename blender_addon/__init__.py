"""LSRM for Blender: the add-on side (runs inside Blender; stdlib + bpy only, never torch).

Today the add-on holds the capture code that turns Blender cameras into bundle frames
(`capture.py`); the sidebar, preferences and operators arrive with the add-on issue.
"""


def register() -> None:
    """Nothing to register yet: the add-on has no user interface so far."""


def unregister() -> None:
    """Nothing to unregister yet."""
