"""A complete small setup to try gapwatch on: scikit-learn's bundled digits and a CNN.

``python -m gapwatch.demo --help`` lists the main job's options (:func:`main`).
"""

from gapwatch.demo.data import (
    VISION_DATASETS,
    DigitsDataModule,
    Mnist5kDataModule,
    VisionDataModule,
)
from gapwatch.demo.main import format_table, main
from gapwatch.demo.models import DigitsClassifier, digits_cnn, digits_mlp

__all__ = [
    "VISION_DATASETS",
    "DigitsClassifier",
    "DigitsDataModule",
    "Mnist5kDataModule",
    "VisionDataModule",
    "digits_cnn",
    "digits_mlp",
    "format_table",
    "main",
]
