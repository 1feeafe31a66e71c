"""DICOM SR measurement report (TID 1500) of LV and RV function from a SAX cine segmentation.

The report is a Comprehensive 3D SR instance (DICOM PS3.3 A.35.13) holding a TID 1500 Measurement Report built with
highdicom (Herrmann et al., 2022, https://doi.org/10.1007/s10278-022-00683-y). The observer is a device (medssl and
its model). Each structure is one TID 1411 volumetric ROI group that points at its segment of the DICOM SEG written by
:func:`medssl.io.dicom_seg.cine_segmentation` (the whole segment: the SOP Instance Reference macro forbids naming
frames and a segment together):

* LV cavity (segment 3): LV EDV, ESV (LOINC 8821-1, 8823-7), stroke volume (SCT 90096001, finding site left
  ventricle), EF by MR (LOINC 8811-2);
* RV cavity (segment 1): RV EDV, ESV (LOINC 8822-9, 8824-5), RV stroke volume (SCT 429483009), EF by MR (LOINC 8818-7);
* LV myocardium (segment 2): LV mass (LOINC 18087-7).

Volume concepts come from CID 3835 "Cardiac Volume Measurement", ejection fractions from CID 3833; volumes carry the
method "Multiple Slices" (DCM 122562, CID 3453: Simpson's method of discs). Units are UCUM ``ml``, ``%`` and ``g``.
Every measurement references the source MR instances of the cardiac phase it was measured on (ED for EDV and mass,
ES for ESV, both for SV and EF), which is how the report records the ED and ES frames. Values that could not be
measured (NaN in :class:`medssl.clinical.cardiac.CardiacFunction`) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medssl import __version__
from medssl.clinical.cardiac import CardiacFunction
from medssl.errors import DataError
from medssl.io.dicom_seg import MANUFACTURER
from medssl.io.dicom_write import deterministic_uid

__all__ = ["measurement_report"]

_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_GRAM = hd.sr.CodedConcept("g", "UCUM", "gram")


@dataclass(frozen=True)
class _Item:
    """One measurement: CardiacFunction field, concept, unit, phases it is measured on, whether it is a volume."""

    field: str
    concept: Code
    unit: hd.sr.CodedConcept
    phases: tuple[str, ...]
    volumetric: bool


@dataclass(frozen=True)
class _Group:
    """One TID 1411 group: the structure, its SEG segment number, finding site and measurements."""

    name: str
    segment_number: int
    site: Code
    items: tuple[_Item, ...]


def _ventricle(name: str, segment_number: int, site: Code, prefix: str, concepts: tuple[Code, ...]) -> _Group:
    """The cavity group of one ventricle: EDV, ESV, SV, EF with the ``CardiacFunction`` fields ``<prefix>_...``."""
    edv, esv, sv, ef = concepts
    return _Group(
        name,
        segment_number,
        site,
        (
            _Item(f"{prefix}_edv_ml", edv, _ML, ("ed",), True),
            _Item(f"{prefix}_esv_ml", esv, _ML, ("es",), True),
            _Item(f"{prefix}_sv_ml", sv, _ML, ("ed", "es"), True),
            _Item(f"{prefix}_ef_pct", ef, _PERCENT, ("ed", "es"), False),
        ),
    )


_GROUPS = (
    _ventricle(
        "LV cavity",
        3,
        codes.SCT.LeftVentricle,
        "lv",
        (codes.LN.LeftVentricularEDVolume, codes.LN.LeftVentricularESVolume, codes.SCT.StrokeVolume,
         codes.LN.LeftVentricularEjectionFractionByMR),
    ),
    _ventricle(
        "RV cavity",
        1,
        codes.SCT.RightVentricle,
        "rv",
        (codes.LN.RightVentricularEDVolume, codes.LN.RightVentricularESVolume, codes.SCT.RightVentricularStrokeVolume,
         codes.LN.RightVentricularEjectionFractionByMR),
    ),
    _Group(
        "LV myocardium",
        2,
        codes.SCT.LeftVentricleMyocardium,
        (_Item("lv_mass_g", codes.LN.LeftVentricleMass, _GRAM, ("ed",), True),),
    ),
)


def _check_inputs(function: CardiacFunction, segmentation: Dataset, sources: Sequence[Sequence[Dataset]]) -> None:
    """Raise a DataError unless the measurements, the SEG and the ``[S][T]`` sources belong together."""
    if not isinstance(function, CardiacFunction):
        raise DataError(f"function must be a CardiacFunction (see cardiac_function), got {type(function).__name__}.")
    if getattr(segmentation, "SOPClassUID", None) != _SEGMENTATION_STORAGE:
        raise DataError(
            "segmentation must be a DICOM Segmentation (see medssl.io.dicom_seg.cine_segmentation), got SOP class "
            f"{getattr(segmentation, 'SOPClassUID', None)}."
        )
    lengths = {len(row) for row in sources}
    if not sources or len(lengths) != 1 or 0 in lengths:
        raise DataError(
            f"sources must be a non-empty [S][T] nested list of datasets, got {len(sources)} slice(s) with frame "
            f"counts {sorted(lengths)}."
        )
    num_frames = lengths.pop()
    for name, frame in (("ed_frame", function.ed_frame), ("es_frame", function.es_frame)):
        if not 0 <= frame < num_frames:
            raise DataError(f"function.{name} = {frame} is outside the {num_frames} frame(s) of sources.")
    if segmentation.StudyInstanceUID != sources[0][0].StudyInstanceUID:
        raise DataError("segmentation and sources belong to different studies (StudyInstanceUID differs).")


def measurement_report(
    function: CardiacFunction,
    segmentation: Dataset,
    sources: Sequence[Sequence[Dataset]],
    *,
    model_name: str = "cine_seg",
    model_version: str = __version__,
    series_number: int = 902,
    series_description: str = "medssl cardiac function",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 measurement report of LV/RV volumes, stroke volumes, EF and LV mass (see the module docs).

    Args:
        function: the measurements, from :func:`medssl.clinical.cardiac.cardiac_function`; NaN values are skipped,
            and a structure without any finite value gets no group.
        segmentation: the DICOM SEG of the same cine (:func:`medssl.io.dicom_seg.cine_segmentation`), referenced by
            every group.
        sources: ``[S][T]`` headers of the source MR instances (pixel data not needed), as given to the SEG;
            ``function.ed_frame`` and ``function.es_frame`` index their ``T`` axis.
        model_name: segmentation model, recorded as the observer device's model and algorithm name.
        model_version: algorithm version; default the medssl version.
        series_number: Series Number of the new SR series.
        series_description: Series Description of the new SR series.
        series_instance_uid: UID of the new series; default a new UID.
        sop_instance_uid: UID of the SR instance; default a new UID.

    Returns:
        The Comprehensive 3D SR dataset; save it with :func:`medssl.io.dicom_seg.write_dicom`.

    Raises:
        DataError: when ``function`` is not a CardiacFunction, ``segmentation`` is not a Segmentation of the same
            study as ``sources``, ``sources`` is not a non-empty ``[S][T]`` list, the ED/ES frame is out of range, or
            no value at all is finite.
    """
    _check_inputs(function, segmentation, sources)
    frame_sources = {phase: [row[frame] for row in sources] for phase, frame in (("ed", function.ed_frame),
                                                                                 ("es", function.es_frame))}
    ed_es_images = list({image.SOPInstanceUID: image for images in frame_sources.values() for image in images}.values())
    algorithm = hd.sr.AlgorithmIdentification(name=f"medssl {model_name}"[:64], version=model_version[:64])
    groups = []
    for group in _GROUPS:
        measurements = []
        for item in group.items:
            value = getattr(function, item.field)
            if value is None or not math.isfinite(value):
                continue
            images = {image.SOPInstanceUID: image for phase in item.phases for image in frame_sources[phase]}
            measurements.append(
                hd.sr.Measurement(
                    name=item.concept,
                    value=float(value),
                    unit=item.unit,
                    method=codes.DCM.MultipleSlices if item.volumetric else None,
                    finding_sites=[hd.sr.FindingSite(group.site)],
                    referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(i) for i in images.values()],
                )
            )
        if not measurements:
            continue
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=group.segment_number,
            # ED and ES images rather than a source series: a cine stack may span one series per slice.
            source_images=[hd.sr.SourceImageForSegmentation.from_source_image(image) for image in ed_es_images],
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=deterministic_uid(segmentation.SOPInstanceUID, "tracking", group.segment_number),
                    identifier=group.name,
                ),
                referenced_segment=segment,
                finding_type=group.site,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(group.site)],
                measurements=measurements,
            )
        )
    if not groups:
        raise DataError(
            "no LV or RV volume, EF or LV mass could be measured (all are NaN; see CardiacFunction.flags), so there "
            "is nothing to put in a DICOM SR measurement report."
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=deterministic_uid("medssl observer device", model_name),
            name=f"medssl {model_name}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=model_name[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.CardiacMRI,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[segmentation, *ed_es_images],
        content=report,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=series_description[:64],
    )
