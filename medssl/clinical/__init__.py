"""Clinical analysis: cardiac volumes, ejection fraction and mass from cine segmentations."""

from medssl.clinical.cardiac import (
    MYOCARDIAL_DENSITY_G_PER_ML,
    PLAUSIBLE_EF_RANGE_PCT,
    CardiacFunction,
    VolumeCurves,
    cardiac_function,
    ejection_fraction,
    ventricular_volumes,
)

__all__ = [
    "MYOCARDIAL_DENSITY_G_PER_ML",
    "PLAUSIBLE_EF_RANGE_PCT",
    "CardiacFunction",
    "VolumeCurves",
    "cardiac_function",
    "ejection_fraction",
    "ventricular_volumes",
]
