"""Results as DICOM Structured Reports a PACS stores beside the study (``app.infer --dicom-sr``).

One Comprehensive 3D SR per classified DICOM series (highdicom's ``Comprehensive3DSR``), holding
a TID 1500 measurement report: P(abnormal) as a measurement, the label at the model's threshold
as a qualitative evaluation, the model (name, version, checkpoint SHA-256, threshold, training
data) as the algorithm's identification and parameters, and each of the scan's warnings as a
comment. The SR joins the series' study (same Study Instance UID, patient and study attributes
copied from the series), in a new series with a new SOP Instance UID, and references the source
series as its evidence. A failed scan gets none (its reason stays in predictions.csv); a NIfTI
input belongs to no DICOM study and gets none.
"""

from __future__ import annotations

import warnings as warnings_module
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from app.runtime.files import atomic_write

__all__ = ["CODING_SCHEME", "GRADE", "LABEL", "PROBABILITY", "SR_SERIES_NUMBER", "write_dicom_sr"]

#: this app's private coding scheme (DICOM PS3.16: private schemes start with "99")
CODING_SCHEME = "99CTCLASSIFY"
#: the measurement: the model's P(abnormal), unitless
PROBABILITY = Code("P-ABNORMAL", CODING_SCHEME, "Probability of viral pneumonia")
#: the qualitative evaluation: the label at the model's threshold
LABEL = Code("LABEL", CODING_SCHEME, "Classification at the model threshold")
#: a severity model's grade (the median of its grade probabilities), qualitative
GRADE = Code("GRADE", CODING_SCHEME, "Severity grade")
#: what the scans are examined for
FINDING = Code("75570004", "SCT", "Viral pneumonia")
#: the procedure the report is of
PROCEDURE = Code("24627-2", "LN", "CT Chest")
#: a free-text comment (a warning about the scan)
COMMENT = Code("121106", "DCM", "Comment")
UNITLESS = Code("1", "UCUM", "no units")
#: the series number of every SR this app writes (the source series keep theirs)
SR_SERIES_NUMBER = 9901


def _app_version() -> str:
    try:
        return version("ctclassify")
    except PackageNotFoundError:
        return "unknown"


def _label_code(label: str) -> Code:
    return Code(label.upper()[:16], CODING_SCHEME, label)


def write_dicom_sr(
    files: Sequence[str],
    prob_abnormal: float,
    label: str,
    warnings: Sequence[str],
    model: dict[str, object],
    out: Path,
    grade: str | None = None,
    grade_probs: Sequence[tuple[str, float]] = (),
) -> Path:
    """Write the SR of one classified DICOM series (its ``files``) to ``out``, atomically.

    Args:
        files: the series' files (headers are read, never pixels).
        prob_abnormal: the model's P(abnormal) for the series.
        label: the label at the model's threshold.
        warnings: the scan's warnings, each a comment in the report.
        model: ``description`` (one line: what the model is and was trained on), ``sha256``,
            ``threshold`` and ``checkpoint`` (its file name is kept, never its folder).
        out: the file to write.
        grade: a severity model's grade (a qualitative evaluation beside the label).
        grade_probs: a severity model's (grade, probability) pairs (a comment).
    """
    evidence = [_header(f) for f in files]
    with warnings_module.catch_warnings():  # highdicom's notes on the source's own names
        warnings_module.simplefilter("ignore", UserWarning)
        sr = _report(evidence, prob_abnormal, label, warnings, model, grade, grade_probs)
    atomic_write(out, lambda tmp: sr.save_as(tmp, enforce_file_format=True))
    return out


def _header(path: str) -> pydicom.Dataset:
    """A series file's header as highdicom takes it: an empty Specific Character Set (real
    series carry one; highdicom refuses it) is the default repertoire, which leaving it out says."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    if "SpecificCharacterSet" in dataset and not dataset.SpecificCharacterSet:
        del dataset.SpecificCharacterSet
    return dataset


def _report(
    evidence: Sequence[pydicom.Dataset],
    prob_abnormal: float,
    label: str,
    warnings: Sequence[str],
    model: dict[str, object],
    grade: str | None = None,
    grade_probs: Sequence[tuple[str, float]] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR object: the measurement report on the series of ``evidence``."""
    evaluations = [hd.sr.QualitativeEvaluation(name=LABEL, value=_label_code(label))]
    if grade is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=GRADE, value=_label_code(grade)))
    comments = [f"warning: {w}" for w in warnings]
    if grade_probs:
        comments.append(
            "grade probabilities: " + ", ".join(f"{name} {p:.6f}" for name, p in grade_probs)
        )
    checkpoint = Path(str(model.get("checkpoint") or "unknown")).name
    algorithm = hd.sr.AlgorithmIdentification(
        name="ctclassify 3D CNN",
        version=_app_version(),
        parameters=[
            f"checkpoint {checkpoint}",
            f"checkpoint SHA-256 {model.get('sha256') or 'unknown'}",
            f"threshold {float(str(model['threshold'])):g}",
            str(model.get("description") or "")[:1024],
        ],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier="ctclassify classification"
        ),
        algorithm_id=algorithm,
        finding_type=FINDING,
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY, value=float(prob_abnormal), unit=UNITLESS, algorithm_id=algorithm
            )
        ],
        qualitative_evaluations=evaluations,
    )
    for comment in comments:  # TEXT items the Comprehensive 3D SR IOD allows in a container
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=comment[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="ctclassify", model_name="ctclassify 3D CNN"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ctclassify",
        is_complete=True,
        series_description="ctclassify: normal vs viral pneumonia (research use only)",
    )
