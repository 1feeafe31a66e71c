"""Synthetic PA chest radiographs with exact multi-label findings and lesion masks.

Each image is an analytic chest (body habitus, inspiration depth, positioning and rotation, ribs, clavicles, spine,
heart and mediastinum, diaphragm domes, gastric bubble, breast shadows, branching lung vessels and parenchymal
texture) projected as attenuation line integrals and passed through a digital radiography chain (scatter, quantum
noise, dynamic range compression, edge enhancement, windowing, collimation). Findings: cardiomegaly (measured
cardiothoracic ratio > 0.5), pleural effusion (meniscus, blunted costophrenic angle), nodules, pneumothorax
(visceral pleural line, no lung markings beyond it) and consolidation, each with a pixel mask. Rendering a seed
with and without findings gives exact lesion-insertion pairs for anomaly detection.

Modules: :mod:`~medssl.data.cxr_phantom.anatomy`, :mod:`~.findings`, :mod:`~.radiograph` (one image),
:mod:`~.cohort` (PNG files and manifest).
"""

from medssl.data.cxr_phantom.cohort import MODES, ensure_cxr_cohort, lesion_findings, write_cxr_cohort
from medssl.data.cxr_phantom.findings import FINDINGS, LOCAL_FINDINGS, PREVALENCE
from medssl.data.cxr_phantom.radiograph import GENERATOR, Radiograph, cardiothoracic_ratio, generate_radiograph

__all__ = [
    "FINDINGS",
    "GENERATOR",
    "LOCAL_FINDINGS",
    "MODES",
    "PREVALENCE",
    "Radiograph",
    "cardiothoracic_ratio",
    "ensure_cxr_cohort",
    "generate_radiograph",
    "lesion_findings",
    "write_cxr_cohort",
]
