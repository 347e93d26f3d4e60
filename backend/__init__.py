"""LSRM for Blender: the reconstruction backend (cameras, field, renderer, export, CLI)."""

__version__ = "0.1.0"
