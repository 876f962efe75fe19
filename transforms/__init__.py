"""MONAI dictionary transforms and presets of ctclassify."""

import logging
import warnings

# MONAI announces on every LoadImage that the optional GPU DICOM decoder (nvImageCodec) is
# absent; pydicom's own decoders are used instead, which is what we want.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)

from .augment import BatchAxialRotation, RandDiscreteAxialRotated  # noqa: E402
from .presets import eval_transforms, train_transforms  # noqa: E402

__all__ = ["BatchAxialRotation", "RandDiscreteAxialRotated", "eval_transforms", "train_transforms"]
