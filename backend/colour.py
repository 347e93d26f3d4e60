"""The one colour conversion: sRGB transfer function <-> linear.

Everything inside the backend is linear. PNG inputs are decoded with `srgb_to_linear`;
the glTF base-colour texture and previews are encoded with `linear_to_srgb`.
"""

import torch


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """Decode sRGB-encoded values in [0, 1] to linear (IEC 61966-2-1)."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Encode linear values to sRGB in [0, 1]; values above 1 clip."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)
