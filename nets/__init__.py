"""Networks of ctclassify."""

from .cnn3d import CNN3D, min_spatial_size

__all__ = ["CNN3D", "min_spatial_size"]
