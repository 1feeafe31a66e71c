"""Synthetic chest CT in Hounsfield units with an exact nodule class: whole slices, nodule-candidate patches or
volumes, cohorts on disk.

- :mod:`medssl.data.ct_phantom.scene`: the random patient (body, fat, muscle, ribs, spine, lungs, vessels, heart,
  aorta, nodule), the centre of a candidate patch, and the partial-volume rendering with texture and noise;
- :mod:`medssl.data.ct_phantom.cohort`: :func:`ensure_ct_cohort` (NIfTI + manifest, deterministic per seed,
  resumable) and :func:`load_ct_datalist`.
"""

from medssl.data.ct_phantom.cohort import (
    GENERATOR,
    ensure_ct_cohort,
    generate_ct_image,
    load_ct_datalist,
    write_ct_cohort,
)
from medssl.data.ct_phantom.scene import CT_CLASSES, MIXED, TISSUES, CTImage

__all__ = [
    "CT_CLASSES",
    "CTImage",
    "GENERATOR",
    "MIXED",
    "TISSUES",
    "ensure_ct_cohort",
    "generate_ct_image",
    "load_ct_datalist",
    "write_ct_cohort",
]
