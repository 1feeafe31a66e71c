"""Synthetic cine cardiac MR cohorts with exact ground truth: medssl's embedded default data.

Each subject has one analytic 3D heart (LV, myocardium, RV, atria, papillary muscles, trabeculations) beating
through a 20-30 frame cycle inside an analytic body (chest wall, ribs, lungs, liver, spine, great vessels), cut
into a short-axis cine stack and two- and four-chamber long-axis cines, rendered with balanced-SSFP contrast,
coil shading, partial volume and Rician noise, and stored as 12-bit NIfTI (optionally DICOM). Ground truth per
subject: ACDC labels per frame, exact LV/RV volumes per frame, EDV/ESV/SV/EF, LV mass, disease group
(NOR, DCM, HCM, MINF, ARV), BSA and LAX-4C landmarks (mitral hinges, apex).

Modules: :mod:`~medssl.data.phantom.anatomy` (heart geometry, motion, exact volumes), :mod:`~.groups` (disease
groups), :mod:`~.torso` (surroundings), :mod:`~.render` (planning and bSSFP rendering), :mod:`~.cohort`
(subjects, files, manifest).
"""

from medssl.data.phantom.cohort import (
    CinePhantom,
    PhantomOptions,
    ensure_cohort,
    generate_subject,
    is_phantom_cohort,
    subject_seed,
    write_cohort,
)
from medssl.data.phantom.groups import GROUPS

__all__ = [
    "GROUPS",
    "CinePhantom",
    "PhantomOptions",
    "ensure_cohort",
    "generate_subject",
    "is_phantom_cohort",
    "subject_seed",
    "write_cohort",
]
