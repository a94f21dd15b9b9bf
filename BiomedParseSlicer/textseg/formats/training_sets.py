"""Corrected segmentations exported for fine-tuning: an nnU-Net v2 raw dataset and a MONAI datalist.

Layout (nnU-Net's ``documentation/dataset_format.md``)::

    <out>/Dataset<ID>_<Name>/
        dataset.json        {"channel_names": {"0": <channel>}, "labels": {"background": 0, <prompt>: 1, ...},
                             "numTraining": N, "file_ending": ".nii.gz"}
        imagesTr/<CASE>_0000.nii.gz     the image, one channel, its own values and geometry
        labelsTr/<CASE>.nii.gz          integer labels 0..len(labels), exactly the image's grid
        datalist.json       MONAI's format (load_decathlon_datalist): {"training": [{"image", "label"}, ...]}
        textseg_export.json what textseg wrote: per case its sources, options and each file's SHA-256

Rules:
- Labels are given once for the dataset, in order: value n is the n-th name (1-based), background 0. A segment
  whose name is not among them is left out and listed in the case's record (``ignored_segments``); a label no
  segment of a case has is simply absent from that case (nnU-Net allows it). A case none of whose segments is
  among the labels is refused (its label file would be all background: a wrong name or a label map read
  without its labels JSON, not a finding).
- Overlapping segments (a voxel in two labelled segments): ``overlap="refuse"`` (default) stops with one line
  naming the two segments and the voxel count; ``overlap="later-wins"`` gives the voxel the label that comes
  later in ``labels`` and records the count per pair in the case's record. Never silent.
- The segmentation must be on the image's grid, or on the same lattice with another extent (placed exactly);
  other grids are refused (see ``textseg.analysis.corrections.onto_grid``).
- Resumable and never overwriting: a case whose files exist with the SHA-256 recorded in ``textseg_export.json``
  for the same sources and options is skipped unread; a file that exists without a record (a run stopped
  half-way through a case) is read back and kept if it is identical, voxel for voxel and in geometry, to what
  would be written; a different existing file is refused unless ``overwrite=True``. Cases already in the dataset
  and not in this call are kept. ``dataset.json`` must agree with the call's labels, channel name and file
  ending, else the export is refused (a dataset's labels cannot change under its cases).
- Atomic: each file is written under a temporary name in ``<dataset>/.textseg-tmp/`` (the same file system;
  not in imagesTr/labelsTr, where nnU-Net takes every file with the file ending for a case) and moved into
  place with ``os.replace``. Label first, then image, then the JSON files: ``dataset.json``, ``datalist.json``
  and ``textseg_export.json`` are rewritten after every case, so a cancel (checked between cases) leaves only
  complete cases and JSON files that count exactly them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..analysis.corrections import load_segmentation, onto_grid
from ..errors import InputError, OutputExistsError
from ..runcontrol import CancelToken, ProgressFn
from ..volume import Volume
from .atomic import windows_reserved
from .segments import Segment

PathLike = Union[str, Path]

FILE_ENDINGS = (".nii.gz", ".nrrd", ".mha")
OVERLAP_RULES = ("refuse", "later-wins")
MANIFEST = "textseg_export.json"
MANIFEST_FORMAT = "textseg-training-export/1"
TMP_DIR = ".textseg-tmp"
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class TrainingCase:
    """One (image, corrected segmentation) pair. ``image``: a path textseg reads or a Volume; ``segmentation``:
    a path (``.seg.nrrd``, DICOM SEG, label map with ``labels_file``) or a (grid, segments) pair.
    ``case_id``: nnU-Net's case identifier (letters, digits, ``_``, ``-``); default: the image file's name."""

    image: PathLike | Volume
    segmentation: PathLike | tuple[Volume, Sequence[Segment]]
    case_id: str | None = None
    labels_file: PathLike | None = None


@dataclass
class ExportResult:
    dataset_dir: Path
    written: list[str] = field(default_factory=list)  # cases written (or finished) by this call
    skipped: list[str] = field(default_factory=list)  # cases found complete and verified
    cancelled: bool = False
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # case -> its manifest record

    @property
    def dataset_json(self) -> Path:
        return self.dataset_dir / "dataset.json"

    @property
    def datalist_json(self) -> Path:
        return self.dataset_dir / "datalist.json"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's ``Dataset<3-digit id>_<name>``."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise InputError(f"dataset id must be an integer from 1 to 999 (nnU-Net's three digits); got {dataset_id!r}.")
    if not _NAME.fullmatch(name or ""):
        raise InputError(f"dataset name {name!r}: use letters, digits, '_' and '-' (e.g. 'LiverCorrected').")
    return f"Dataset{dataset_id:03d}_{name}"


def export_nnunet(cases: Sequence[TrainingCase], out_dir: PathLike, dataset_id: int, dataset_name: str,
                  labels: Sequence[str], channel_name: str, *, file_ending: str = ".nii.gz",
                  overlap: str = "refuse", overwrite: bool = False, progress: ProgressFn | None = None,
                  cancel: Any = None) -> ExportResult:
    """Write (or complete) ``<out_dir>/Dataset<ID>_<Name>`` from ``cases``; see the module docstring.

    ``labels``: the segment names, one per prompt, in label order. ``channel_name``: nnU-Net's channel name of
    the image ("CT" selects nnU-Net's CT normalisation; "MRI", "PET", ... z-scoring). ``progress(fraction,
    stage)`` after each case; ``cancel`` (CancelToken, threading.Event or callable) is checked between cases:
    the result then has ``cancelled=True`` and the dataset holds the complete cases."""
    labels = [str(x) for x in labels]
    _check_options(labels, channel_name, file_ending, overlap)
    root = Path(out_dir) / dataset_folder_name(dataset_id, dataset_name)
    _check_dataset_id_free(Path(out_dir), dataset_id, root.name)
    ids = _case_ids(cases)
    spec = {"labels": {"background": 0, **{n: v for v, n in enumerate(labels, start=1)}},
            "channel_names": {"0": channel_name}, "file_ending": file_ending}
    manifest = _open_dataset(root, spec, overwrite)
    result = ExportResult(root)
    for sub in ("imagesTr", "labelsTr", TMP_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    try:
        for n, (case, cid) in enumerate(zip(cases, ids)):
            if CancelToken.of(cancel).cancelled:
                result.cancelled = True
                break
            options = {"labels": labels, "channel_name": channel_name, "file_ending": file_ending,
                       "overlap": overlap}
            fingerprint = _fingerprint(case, options)
            old = manifest["cases"].get(cid)
            if old and old.get("fingerprint") == fingerprint and _files_verified(root, old):
                result.skipped.append(cid)
                result.records[cid] = old
            else:
                record = _export_case(root, case, cid, labels, file_ending, overlap, overwrite)
                record["fingerprint"] = fingerprint
                manifest["cases"][cid] = record
                _write_jsons(root, spec, manifest)
                result.written.append(cid)
                result.records[cid] = record
            if progress:
                progress((n + 1) / len(cases), f"{cid}: {'verified' if cid in result.skipped else 'written'}")
        if not result.cancelled:
            _write_jsons(root, spec, manifest)  # also when every case was skipped (e.g. JSON files removed)
    finally:
        shutil.rmtree(root / TMP_DIR, ignore_errors=True)
    return result


def _check_options(labels: list[str], channel_name: str, file_ending: str, overlap: str) -> None:
    if not labels:
        raise InputError("give at least one label (the segment names to export, one per prompt).")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise InputError(f"labels must be distinct; repeated: {', '.join(dup)}.")
    if "background" in labels or any(not x.strip() for x in labels):
        raise InputError("'background' (label 0) and empty names cannot be labels; name the segments' structures.")
    if not str(channel_name or "").strip():
        raise InputError("give the image's channel name for nnU-Net (e.g. CT, MRI, PET: CT selects CT normalisation).")
    if file_ending not in FILE_ENDINGS:
        raise InputError(f"file ending {file_ending!r}: use one of {', '.join(FILE_ENDINGS)} (lossless formats).")
    if overlap not in OVERLAP_RULES:
        raise InputError(f"overlap rule {overlap!r}: use one of {', '.join(OVERLAP_RULES)}.")


def _check_dataset_id_free(out_dir: Path, dataset_id: int, folder: str) -> None:
    if not out_dir.is_dir():
        return
    prefix = f"Dataset{dataset_id:03d}_"
    others = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(prefix) and p.name != folder)
    if others:
        raise InputError(f"{out_dir} already has {others[0]} with dataset id {dataset_id}; nnU-Net needs unique ids: "
                         "choose another id.")


def _case_ids(cases: Sequence[TrainingCase]) -> list[str]:
    ids = []
    for case in cases:
        cid = case.case_id
        # a derived id is the image's name: say which image, and how to give an id instead (the CLI's CSV)
        where = "" if cid is not None else (f" (from the image {Path(case.image).name}; give an id in a case_id "
                                            "column of a --cohort CSV)")
        if cid is None:
            if not isinstance(case.image, (str, Path)):
                raise InputError("a case given as an in-memory image needs a case_id.")
            cid = re.sub(r"[^A-Za-z0-9_-]+", "_", _stem(Path(case.image))).strip("_")
        if not _CASE_ID.fullmatch(cid or ""):
            raise InputError(f"case id {cid!r}{where}: use letters, digits, '_' and '-' (nnU-Net case identifiers).")
        if re.search(r"_\d{4}$", cid):
            raise InputError(f"case id {cid!r}{where} ends like nnU-Net's channel suffix (_0000); rename the case.")
        if windows_reserved(cid):
            raise InputError(f"case id {cid!r}{where} is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, "
                             "LPT1-9): its files could not be copied there; choose another id.")
        if cid in ids:
            raise InputError(f"two cases have the id {cid!r}{where}; give each case its own case_id.")
        ids.append(cid)
    return ids


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _open_dataset(root: Path, spec: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest of an existing export (checked against ``spec``) or a new one."""
    ds, man = root / "dataset.json", root / MANIFEST
    if man.exists():
        try:
            manifest = json.loads(man.read_text())
            assert manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("cases"), dict)
        except (ValueError, AssertionError):
            raise InputError(f"{man} is not a textseg export record; remove it or export to another dataset id.") \
                from None
    elif ds.exists() and not overwrite:
        raise OutputExistsError(f"{root} holds a dataset.json that textseg did not write; export to another dataset "
                                "id, or pass overwrite to add to it.")
    else:
        manifest = {"format": MANIFEST_FORMAT, "cases": {}}
    if ds.exists():
        try:
            current = json.loads(ds.read_text())
        except ValueError:
            current = {}
        for key in ("labels", "channel_names", "file_ending"):
            if current.get(key) != spec[key] and manifest["cases"]:
                raise InputError(f"{ds} has {key} {json.dumps(current.get(key))}, this export "
                                 f"{json.dumps(spec[key])}; a dataset's {key} cannot change under its cases: "
                                 "export to another dataset id.")
    return manifest


def _fingerprint(case: TrainingCase, options: dict[str, Any]) -> str:
    """Sources (a file's path, size and modification time; an in-memory array's content) and options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for src in (case.image, case.segmentation, case.labels_file):
        if src is None:
            h.update(b"none")
        elif isinstance(src, (str, Path)):
            p = Path(src).resolve()
            if p.is_dir():  # a DICOM series: every file's name, size and time
                for f in sorted(p.rglob("*")):
                    if f.is_file():
                        st = f.stat()
                        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
            elif p.exists():
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
            else:
                raise InputError(f"{src}: no such file or folder.")
        elif isinstance(src, Volume):
            _hash_volume(h, src)
        else:
            grid, segments = src
            _hash_volume(h, grid, with_array=False)
            for s in segments:
                h.update(s.name.encode() + b"\0")
                h.update(np.ascontiguousarray(np.asarray(s.mask) > 0).tobytes())
    return h.hexdigest()


def _hash_volume(h: Any, v: Volume, with_array: bool = True) -> None:
    h.update(np.asarray(v.ijk_to_lps, np.float64).tobytes() + str(v.shape).encode())
    if with_array:
        h.update(str(v.array.dtype).encode() + np.ascontiguousarray(v.array).tobytes())


def _files_verified(root: Path, record: dict[str, Any]) -> bool:
    files = record.get("files") or {}
    return bool(files) and all((root / rel).is_file() and _sha256(root / rel) == digest
                               for rel, digest in files.items())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export_case(root: Path, case: TrainingCase, cid: str, labels: list[str], file_ending: str, overlap: str,
                 overwrite: bool) -> dict[str, Any]:
    from .images import read_volume

    image = case.image if isinstance(case.image, Volume) else read_volume(case.image)
    where = str(case.image) if not isinstance(case.image, Volume) else cid
    if image.is_rgb:
        raise InputError(f"{where}: an RGB image; nnU-Net takes RGB only as PNG natural images, which this export "
                         "does not write. Export grey images.")
    grid, segments = load_segmentation(case.segmentation, case.labels_file)
    if not grid.same_grid(image):  # (on the same grid a label map's segments stay lazy: one mask at a time)
        segments = onto_grid(image, grid, list(segments), f"the segmentation of case {cid}")
    label_array, record = label_map(segments, labels, overlap, f"case {cid}")
    record["image_source"] = where
    record["segmentation_source"] = (str(case.segmentation) if isinstance(case.segmentation, (str, Path))
                                     else "(in memory)")
    files: dict[str, str] = {}
    for rel, array in ((f"labelsTr/{cid}{file_ending}", label_array),
                       (f"imagesTr/{cid}_0000{file_ending}", image.array)):
        files[rel] = _place_file(root, rel, image, array, overwrite)
    record["files"] = files
    return record


def label_map(segments: Sequence[Segment], labels: Sequence[str], overlap: str = "refuse",
              where: str = "the segmentation") -> tuple[np.ndarray, dict[str, Any]]:
    """The integer label array (value n = ``labels[n-1]``) of ``segments`` and a record: ``labels_present``,
    ``ignored_segments`` (names not among ``labels``), ``overlaps`` (voxels given to the later label, per pair).

    One pass, one mask in memory at a time (``segments`` may build its masks on access, as label maps do);
    several segments with one name are that label's union."""
    value_of = {name: v for v, name in enumerate(labels, start=1)}
    dtype = np.uint8 if len(labels) < 256 else np.uint16
    out: np.ndarray | None = None
    ignored: list[str] = []
    overlaps: dict[str, int] = {}
    for s in segments:
        mask = np.asarray(s.mask) > 0
        if out is None:
            out = np.zeros(mask.shape, dtype)
        value = value_of.get(s.name)
        if value is None:
            ignored.append(s.name)
            continue
        taken = out[mask]
        others = taken[(taken > 0) & (taken != value)]
        for other, count in zip(*np.unique(others, return_counts=True)):
            first, second = sorted((int(other), value))
            if overlap == "refuse":
                raise InputError(f"{where}: segments '{labels[first - 1]}' and '{labels[second - 1]}' overlap in "
                                 f"{int(count)} voxels; a label map holds one label per voxel: fix the overlap, "
                                 "or export with overlap='later-wins' (the later label takes the voxels).")
            pair = f"{labels[first - 1]} / {labels[second - 1]}"
            overlaps[pair] = overlaps.get(pair, 0) + int(count)
        out[mask] = np.maximum(taken, value)  # the later label (higher value) keeps shared voxels
    if out is None:
        raise InputError(f"{where} has no segments to export.")
    if len(ignored) == len(segments):  # an all-background label file would teach the model that nothing is there
        shown = ", ".join(repr(n) for n in ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        raise InputError(f"{where}: none of its segments ({shown}) is among the labels ({', '.join(labels)}); check "
                         "the names, and give a label map its labels JSON so its segments carry their names.")
    present = set(np.unique(out).tolist())
    return out, {"labels_present": [n for n in labels if value_of[n] in present],
                 "ignored_segments": ignored, "overlaps": overlaps}


def _place_file(root: Path, rel: str, grid: Volume, array: np.ndarray, overwrite: bool) -> str:
    """Write ``array`` on ``grid`` at ``root/rel`` atomically, or keep an identical existing file; its SHA-256."""
    import SimpleITK as sitk

    from .images import to_sitk

    target = root / rel
    img = to_sitk(grid, np.ascontiguousarray(array))
    if target.exists():
        if _same_image(target, img):
            return _sha256(target)
        if not overwrite:
            raise OutputExistsError(f"{target} exists and differs from this export; pass overwrite to replace it, or "
                                    "export to another dataset id.")
    fd, tmp = tempfile.mkstemp(prefix=target.name.split(".")[0] + ".", suffix=_ending(rel), dir=root / TMP_DIR)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, useCompression=True)
        os.chmod(tmp, 0o644)
        digest = _sha256(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return digest


def _ending(rel: str) -> str:
    return next(e for e in FILE_ENDINGS if rel.endswith(e))


def _same_image(path: Path, img: Any) -> bool:
    """Whether the file holds exactly ``img``: pixel type, values and geometry."""
    import SimpleITK as sitk

    try:
        old = sitk.ReadImage(str(path))
    except RuntimeError:
        return False  # unreadable (e.g. truncated): not the same
    return (old.GetSize() == img.GetSize() and old.GetPixelID() == img.GetPixelID()
            and np.allclose(old.GetSpacing(), img.GetSpacing(), rtol=0, atol=1e-6)
            and np.allclose(old.GetOrigin(), img.GetOrigin(), rtol=0, atol=1e-4)
            and np.allclose(old.GetDirection(), img.GetDirection(), rtol=0, atol=1e-6)
            and np.array_equal(sitk.GetArrayViewFromImage(old), sitk.GetArrayViewFromImage(img)))


def _write_jsons(root: Path, spec: dict[str, Any], manifest: dict[str, Any]) -> None:
    """dataset.json, datalist.json and the manifest for the cases whose files are all in place."""
    complete = sorted(cid for cid, rec in manifest["cases"].items()
                      if rec.get("files") and all((root / rel).is_file() for rel in rec["files"]))
    ending = spec["file_ending"]
    dataset = {"channel_names": spec["channel_names"], "labels": spec["labels"], "numTraining": len(complete),
               "file_ending": ending, "name": root.name.split("_", 1)[1],
               "description": "Corrected segmentations exported by textseg for fine-tuning."}
    datalist = {"training": [{"image": f"imagesTr/{cid}_0000{ending}", "label": f"labelsTr/{cid}{ending}"}
                             for cid in complete],
                "labels": {str(v): n for n, v in spec["labels"].items()}}
    for name, doc in ((MANIFEST, manifest), ("datalist.json", datalist), ("dataset.json", dataset)):
        _write_json_atomic(root, name, doc)


def _write_json_atomic(root: Path, name: str, doc: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
