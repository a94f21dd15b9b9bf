"""Writing and reading segmentations.

``.seg.nrrd`` (3D Slicer's format) is written with slicerio: one segment per prompt, overlapping
segments in separate layers, name from the prompt, SNOMED CT terminology and standard colour from
``terminology.lookup`` and the provenance of each segment (model, version, prompt, threshold, ...)
as segment tags ``textseg.<key>``. Label maps (NIfTI/NRRD/MHA) are written here too, with a
``.labels.json`` sidecar; DICOM SEG lives in ``dicomseg.py``, and ``segment_files.read_segments`` reads all
three. Outputs are never overwritten unless asked, and are written atomically (``atomic.atomic_output``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import quote, unquote

import numpy as np

from ..errors import InputError, OutputExistsError
from ..volume import Volume, mask_bounds
from .atomic import atomic_output

PathLike = Union[str, Path]
TAG_PREFIX = "textseg."


@dataclass
class Segment:
    name: str
    mask: np.ndarray  # (k, j, i) on the reference grid, 0/1
    color: Optional[tuple[float, float, float]] = None  # 0..1
    terminology: Optional[Any] = None  # slicerio terminology dict or Slicer terminology string
    tags: dict[str, str] = field(default_factory=dict)  # provenance etc.


def segments_from_results(results: Sequence[Any]) -> list[Segment]:
    """Segments from predictor PromptResults: name = the prompt, SNOMED CT terminology and standard
    colour from the shipped table (unknown prompts: generic Tissue, distinct palette colour), and
    the provenance as ``textseg.<key>`` tags (detection boxes as ``textseg.objects``)."""
    from ..terminology import distinct_colors, lookup

    terms = [lookup(r.name) for r in results]
    out = []
    for r, term, color in zip(results, terms, distinct_colors(terms)):
        tags = {TAG_PREFIX + k: (v if isinstance(v, str) else json.dumps(v)) for k, v in r.provenance.items()}
        tags[TAG_PREFIX + "terminology_match"] = term.structure or "none (generic Tissue)"
        if getattr(r, "objects", None):  # detection: bounding box and centroid (LPS mm) per object
            tags[TAG_PREFIX + "objects"] = json.dumps(r.objects)
        name = r.name
        if not getattr(r, "complete", True):  # cancelled part-way: keep it, but never pass it off as whole
            tags[TAG_PREFIX + "complete"] = "false"
            name += " (partial)"
        out.append(Segment(name, r.mask, color, term.to_slicerio(), tags))
    return out


def segment_terminology(segment: Segment):
    """The segment's terminology as a ``terminology.Terminology`` (looked up from its name if unset)."""
    from slicerio.segmentation import terminology_entry_from_string

    from ..terminology import Terminology, color_for, lookup

    t = segment.terminology
    if t is None:
        found = lookup(segment.name)
        return found if segment.color is None else replace(found, color=tuple(segment.color))
    if isinstance(t, str):
        t = terminology_entry_from_string(t)
    term = Terminology.from_slicerio(t)
    color = segment.color or color_for(term.category, term.type, term.type_modifier) or lookup(segment.name).color
    return replace(term, color=tuple(color))


def _terminology_dict(t: Any) -> Optional[dict]:
    """slicerio's terminology dict from a dict, a Slicer terminology string or None."""
    if isinstance(t, str):
        from slicerio.segmentation import terminology_entry_from_string

        return terminology_entry_from_string(t)
    return t


def _escape_tag(value: str) -> str:
    """slicerio stores tags as ``key:value|key:value``: keep ``|`` and newlines out of values; and the NRRD
    header is written as ASCII (pynrrd), so other characters (a prompt or a map path with 'ö') go as UTF-8 %XX."""
    text = str(value).replace("%", "%25").replace("|", "%7C").replace("\n", "%0A")
    return text if text.isascii() else "".join(c if c.isascii() else quote(c, safe="") for c in text)


def _unescape_tag(value: str) -> str:
    return unquote(value)  # every '%' was written as %25, so each %XX is one of ours


def write_seg_nrrd(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False) -> Path:
    """A Slicer .seg.nrrd: a segment shares a layer (label value 1, 2, ...) with the segments it does
    not overlap, as Slicer stores them; overlapping segments go to further layers."""
    import slicerio

    seg = slicerio.create_segmentation(reference.size, reference.ijk_to_lps, dtype="uint8")
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    layers: list[np.ndarray] = []  # (k, j, i) label arrays
    used_values: list[int] = []
    used_ids: set = set()
    for s in segments:
        mask = _checked_mask(s, reference)
        layer, value = _place(layers, mask, used_values)
        seg["segments"].append({**_seg_nrrd_fields(s, _unique_id(s.name, used_ids)),
                                "labelValue": value, "layer": layer, "extent": _extent_ijk(mask)})
    if layers:  # slicerio's voxels are IJK(+layer first): transposed views write fast in NRRD's order
        seg["voxels"] = layers[0].T if len(layers) == 1 else np.stack(layers).transpose(0, 3, 2, 1)
    seg["segments"] = _utf8_tokens(seg["segments"])
    with atomic_output(path, overwrite) as tmp:
        slicerio.write_segmentation(str(tmp), seg)
        _utf8_header(tmp)
    return Path(path)


# Slicer writes and reads .seg.nrrd header values (segment names, tags) as UTF-8; pynrrd writes them as ASCII
# and reads them dropping every other byte. Non-ASCII characters therefore go through pynrrd as these tokens
# and are put into (and read from) the header's bytes here.
_TOKEN = re.compile(r"\{U\+([0-9A-F]{6})\}")
_SEGMENT_FIELD = re.compile(rb"^Segment(\d+)_(Name|Tags):=(.*)$")


def _utf8_tokens(value: Any) -> Any:
    """``value`` (nested lists/dicts of strings) with each non-ASCII character as an ASCII token."""
    if isinstance(value, str):
        return value if value.isascii() else "".join(c if c.isascii() else f"{{U+{ord(c):06X}}}" for c in value)
    if isinstance(value, dict):
        return {k: _utf8_tokens(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_utf8_tokens(v) for v in value)
    return value


def _utf8_header(path: Path) -> None:
    """Turn the tokens of ``_utf8_tokens`` in the header of the NRRD file ``path`` into UTF-8, in place."""
    data = Path(path).read_bytes()
    end = data.find(b"\n\n")
    header = data[:end]
    if b"{U+" not in header:
        return
    text = _TOKEN.sub(lambda m: chr(int(m.group(1), 16)), header.decode("ascii"))
    Path(path).write_bytes(text.encode("utf-8") + data[end:])


def _utf8_fields(path: PathLike) -> dict[tuple[int, str], str]:
    """(segment index, 'Name'|'Tags') -> the field decoded as UTF-8, for a header that is not plain ASCII."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    header = head.split(b"\n\n", 1)[0]
    if header.isascii():
        return {}
    fields = {}
    for line in header.split(b"\n"):
        m = _SEGMENT_FIELD.match(line)
        if m and not line.isascii():
            fields[(int(m.group(1)), m.group(2).decode())] = m.group(3).decode("utf-8", "replace")
    return fields


def _utf8_segment(segment: dict, fields: dict[tuple[int, str], str], index: int) -> dict:
    """slicerio's segment dict with its non-ASCII Name and Tags fields taken from the header's UTF-8 bytes
    (Tags parsed as slicerio parses them)."""
    from slicerio.segmentation import terminology_entry_from_string

    s = dict(segment)
    if (index, "Name") in fields:
        s["name"] = fields[(index, "Name")]
    if (index, "Tags") in fields:
        tags = {}
        for item in fields[(index, "Tags")].split("|"):
            key, sep, value = item.strip().partition(":")
            if not sep:
                continue
            if key == "TerminologyEntry":
                s["terminology"] = terminology_entry_from_string(value)
            elif key != "Segmentation.Status":
                tags[key] = value
        s["tags"] = tags
    return s


def _seg_nrrd_fields(s: Segment, sid: str) -> dict[str, Any]:
    term = segment_terminology(s)  # a segment without terminology/colour gets them from its name
    fields: dict[str, Any] = {"id": sid, "name": s.name, "nameAutoGenerated": False,
                              "color": [float(c) for c in term.color], "colorAutoGenerated": False,
                              "terminology": _terminology_dict(s.terminology) or term.to_slicerio()}
    if s.tags:
        fields["tags"] = {k: _escape_tag(v) if k.startswith(TAG_PREFIX) else v for k, v in s.tags.items()}
    return fields


def _place(layers: list[np.ndarray], mask: np.ndarray, used: list[int]) -> tuple[int, int]:
    """Put ``mask`` in the first layer where it overlaps nothing (label values up to 255);
    ``used[n]`` is the last label value given in layer n (empty segments take a value too)."""
    for index, layer in enumerate(layers):
        if used[index] < 255 and not layer[mask].any():
            used[index] += 1
            layer[mask] = used[index]
            return index, used[index]
    layers.append(mask.astype(np.uint8))
    used.append(1)
    return len(layers) - 1, 1


def _extent_ijk(mask: np.ndarray) -> list[int]:
    """Slicer's segment extent: [i0, i1, j0, j1, k0, k1] (inclusive), empty = [0, -1, 0, -1, 0, -1]."""
    bounds = mask_bounds(mask)
    if bounds is None:
        return [0, -1, 0, -1, 0, -1]
    return [int(v) for axis in (2, 1, 0) for v in (bounds[0][axis], bounds[1][axis])]


def _unique_id(name: str, used: set) -> str:
    base = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in name) or "segment"
    sid, n = base, 1
    while sid in used:
        n += 1
        sid = f"{base}_{n}"
    used.add(sid)
    return sid


def read_seg_nrrd(path: PathLike) -> tuple[Volume, list[Segment]]:
    """Reference geometry (an empty uint8 Volume) and the segments of a .seg.nrrd."""
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except Exception as exc:  # noqa: BLE001 - slicerio raises many kinds
        raise InputError(f"{path}: not a readable .seg.nrrd segmentation ({exc}).") from None
    voxels = seg["voxels"]
    spatial = voxels.shape[-3:]
    ref = Volume.from_matrix(np.zeros(spatial[::-1], np.uint8), seg["ijkToLPS"])
    utf8 = _utf8_fields(path)
    segments = []
    for n, s in enumerate(seg["segments"]):
        if utf8:  # slicerio lists the segments in header index order: Segment0_, Segment1_, ... (Slicer, textseg)
            s = _utf8_segment(s, utf8, n)
        mask = slicerio.segment_mask(seg, s).transpose(2, 1, 0).astype(np.uint8)
        tags = {k: _unescape_tag(v) if k.startswith(TAG_PREFIX) else v for k, v in (s.get("tags") or {}).items()}
        segments.append(Segment(s.get("name", s.get("id", "")), mask, tuple(s["color"]) if "color" in s else None,
                                s.get("terminology"), tags))
    return ref, segments


# ---- NIfTI / NRRD label maps -------------------------------------------------------------------
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABELS_FORMAT = "textseg-labels/1"


def labels_path(labelmap_path: PathLike) -> Path:
    """The sidecar of a label map: ``ct_seg.nii.gz`` -> ``ct_seg.labels.json``."""
    p = Path(labelmap_path)
    name = p.name
    for suf in LABELMAP_SUFFIXES:
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    return p.with_name(name + ".labels.json")


def write_labelmap(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False) -> Path:
    """A label map (NIfTI ``.nii.gz``/``.nii``, NRRD, MHA: by extension) with value ``n`` for the
    n-th segment (1-based), plus the sidecar ``<name>.labels.json`` (value -> name, colour,
    terminology, tags).

    Overlap policy: a label map holds one label per voxel, so where segments overlap the *later*
    segment (later prompt) wins. Nothing is lost silently: the sidecar records, per label, the
    voxels it lost to later labels (``overwritten_voxels``) and its voxel count in the map. Use the
    .seg.nrrd (layers) to keep overlaps."""
    path = Path(path)
    if not path.name.lower().endswith(LABELMAP_SUFFIXES):
        raise InputError(f"{path}: a label map needs one of the extensions {', '.join(LABELMAP_SUFFIXES)}.")
    side = labels_path(path)
    for p in (path, side):
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p} already exists; choose another name or pass --overwrite to replace it.")
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    labels = np.zeros(reference.shape, dtype)
    entries = []
    for value, s in enumerate(segments, start=1):
        mask = _checked_mask(s, reference)
        lost = labels[mask] if mask.any() else labels[:0]
        for earlier, n in zip(*np.unique(lost[lost > 0], return_counts=True)):
            entries[int(earlier) - 1]["overwritten_voxels"] += int(n)
        labels[mask] = value
        entries.append(_label_entry(value, s))
    counts = np.bincount(labels.ravel(), minlength=len(segments) + 1)
    for e in entries:
        e["voxels"] = int(counts[e["value"]])
    from .images import write_image

    doc = {"format": LABELS_FORMAT, "labelmap": path.name, "overlap_policy": "later segment wins", "labels": entries}
    with atomic_output(path, overwrite=True) as tmp:
        write_image(reference, tmp, labels)
        with atomic_output(side, overwrite=True) as tmp_side:
            tmp_side.write_text(json.dumps(doc, indent=1))
    return path


def _checked_mask(s: Segment, reference: Volume) -> np.ndarray:
    if s.mask.shape != reference.shape:
        raise ValueError(f"segment '{s.name}' has shape {s.mask.shape}, reference grid is {reference.shape}")
    return np.asarray(s.mask) > 0


def _label_entry(value: int, s: Segment) -> dict[str, Any]:
    term = segment_terminology(s)
    return {"value": value, "name": s.name, "color": [round(float(c), 6) for c in term.color],
            "terminology": term.to_slicer_string(), "tags": dict(s.tags), "overwritten_voxels": 0}


def read_labels(path: PathLike) -> dict[int, dict[str, Any]]:
    """Label value -> {"name", optional "color", "terminology", "tags"} from a labels JSON: the
    textseg sidecar, a TotalSegmentator-style ``{"1": "spleen", ...}`` or an nnU-Net-style
    ``{"labels": {"background": 0, "liver": 1}}``."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such labels file.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a JSON labels file ({exc}).") from None
    labels = doc.get("labels", doc) if isinstance(doc, dict) else None
    try:
        if isinstance(labels, list):  # textseg sidecar
            return {int(e["value"]): e for e in labels}
        if isinstance(labels, dict) and all(str(k).strip().isdigit() for k in labels):  # "1": "spleen"
            return {int(k): {"name": str(v)} for k, v in labels.items() if int(k) != 0}
        if isinstance(labels, dict):  # "spleen": 1
            return {int(v): {"name": str(k)} for k, v in labels.items() if int(v) != 0}
    except (KeyError, TypeError, ValueError):
        pass
    raise InputError(f"{path}: unrecognised labels JSON. Expected the textseg .labels.json, "
                     '{"1": "name", ...} or {"labels": {"name": 1, ...}}.')


def read_labelmap(path: PathLike, labels: Optional[PathLike] = None, lazy: bool = False
                  ) -> tuple[Volume, Sequence[Segment]]:
    """Reference geometry and one Segment per label value present in the map.

    Names, colours and terminology come from ``labels`` (default: the ``.labels.json`` sidecar if it
    exists); values without an entry are named ``label_<value>`` and get terminology from the name.
    Label values listed in the JSON but absent from the map are skipped. ``lazy=True`` returns a
    sequence that builds each segment's mask when it is accessed (one mask in memory at a time:
    use it for statistics of maps with many labels)."""
    from .images import read_volume

    vol = read_volume(path)
    integral = np.issubdtype(vol.array.dtype, np.integer) or (
        np.issubdtype(vol.array.dtype, np.floating) and bool(np.all(np.mod(vol.array, 1) == 0)))
    if vol.is_rgb or not integral:
        raise InputError(f"{path}: not a label map (values must be integers); give the segmentation, not the image.")
    side = Path(labels) if labels is not None else labels_path(path)
    info = read_labels(side) if (labels is not None or side.exists()) else {}
    segments = LabelmapSegments(vol.array.astype(np.int64, copy=False), info)
    return vol.with_array(np.zeros(vol.shape, np.uint8)), (segments if lazy else list(segments))


class LabelmapSegments(Sequence):
    """The segments of a label array, each mask built on access."""

    def __init__(self, array: np.ndarray, info: dict[int, dict[str, Any]]) -> None:
        self.array, self.info = array, info
        self.values = [int(v) for v in np.unique(array) if v != 0]

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        value = self.values[index]
        e = self.info.get(value, {})
        seg = Segment(e.get("name") or f"label_{value}", (self.array == value).astype(np.uint8),
                      tuple(e["color"]) if e.get("color") else None, e.get("terminology"),
                      {k: str(v) for k, v in (e.get("tags") or {}).items()})
        if seg.terminology is None:
            term = segment_terminology(seg)
            seg.terminology, seg.color = term.to_slicerio(), seg.color or term.color
        seg.tags.setdefault(TAG_PREFIX + "label_value", str(value))
        return seg


def resample_segments(source: Volume, segments: Sequence[Segment], target: Volume) -> list[Segment]:
    """The segments (on ``source``'s grid) on ``target``'s grid: unchanged if the grids are the same,
    else nearest-neighbour resampling in physical space (as Slicer does for statistics); voxels of
    ``target`` outside ``source`` are background."""
    if source.same_grid(target):
        return list(segments)
    import SimpleITK as sitk

    from .images import to_sitk

    ref_img = to_sitk(target, np.zeros(target.shape, np.uint8))
    out = []
    for s in segments:
        img = sitk.Resample(to_sitk(source, np.asarray(s.mask, np.uint8)), ref_img, sitk.Transform(),
                            sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out.append(replace(s, mask=sitk.GetArrayFromImage(img)))
    return out
