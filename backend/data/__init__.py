"""Synthetic training and test data: procedural SDF objects with PBR materials, rendered on the fly."""
