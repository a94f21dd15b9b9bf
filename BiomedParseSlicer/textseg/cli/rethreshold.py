"""`textseg rethreshold`: rebuild an AI segment of a .seg.nrrd from its kept probability map at another
threshold, without running the model again. A segment edited by hand since the engine wrote it is refused
unless --replace; the input is never overwritten unless --overwrite."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputExistsError, UsageError
from ..volume import Volume

SEG_SUFFIX = ".seg.nrrd"


def cmd_rethreshold(args) -> int:
    from ..analysis.confidence import (
        DEFAULT_BAND,
        MaskFingerprint,
        band_levels,
        check_threshold,
        confidence,
        confidence_tags,
        edited_since,
        rethreshold,
        uncertain_mask,
    )
    from ..analysis.corrections import onto_grid, same_lattice
    from ..formats.probability_maps import FILE_TAG, find_map, moved_references, read_probability_map
    from ..formats.segments import TAG_PREFIX, Segment, read_seg_nrrd, write_seg_nrrd

    src = Path(args.segmentation)
    threshold = check_threshold(args.threshold)
    band = DEFAULT_BAND if args.band is None else args.band
    band_levels(threshold, band)  # refuses a band outside 0..1 before any file is read
    if not src.name.lower().endswith(SEG_SUFFIX):
        raise UsageError(f"{src}: give the .seg.nrrd that `textseg segment --probabilities` wrote (its segments "
                         "carry the tags a re-threshold needs).")
    if args.out and not args.overwrite and Path(args.out).exists():
        raise OutputExistsError(f"{args.out} already exists; choose another name or pass --overwrite to replace it.")
    if args.out and not str(args.out).lower().endswith(SEG_SUFFIX):
        raise UsageError(f"--out must end with {SEG_SUFFIX} (got {args.out}).")
    if not args.out and not args.overwrite:
        raise UsageError(f"Give --out NEW{SEG_SUFFIX} for the result, or --overwrite to replace {src} itself.")
    out = Path(args.out) if args.out else src
    if not src.is_file():
        raise InputError(f"{src}: no such file.")
    ref, segments = read_seg_nrrd(src)
    names = [s.name for s in segments]
    if args.segment not in names:
        raise UsageError(f"{src} has no segment '{args.segment}'; its segments: {', '.join(map(repr, names))}.")
    if names.count(args.segment) > 1:
        raise UsageError(f"{src} has {names.count(args.segment)} segments named '{args.segment}'; rename all but one "
                         "(in Slicer: Segment Editor, double-click the name) so the one to rebuild is unambiguous.")
    index = names.index(args.segment)
    seg = segments[index]

    path = find_map(seg, src, args.probabilities)
    if path is None:
        named = seg.tags.get(FILE_TAG)
        where = f"{args.probabilities}" if args.probabilities else f"{src.parent / named}" if named else None
        if where is None:
            raise InputError(f"'{seg.name}' names no probability map (no {FILE_TAG} tag): segment with "
                             "--probabilities DIR to keep one, or give its folder with --probabilities DIR.")
        raise InputError(f"The probability map of '{seg.name}' is not in {where}; give the folder holding it with "
                         "--probabilities DIR.")
    prob = read_probability_map(path)
    if not prob.same_grid(ref) and same_lattice(prob, ref):
        # the same lattice, another extent (Slicer can save a .seg.nrrd cropped to its segments): the segments go
        # onto the map's grid, where the model made them and where the new mask may need room
        segments = onto_grid(prob, ref, segments, str(src))
        ref = Volume(np.zeros(prob.shape, np.uint8), prob.spacing, prob.origin, prob.direction)
        seg = segments[index]
    if not prob.same_grid(ref):
        raise InputError(f"{path}: the map is on another grid ({prob.describe()}, origin {prob.origin}) than {src} "
                         f"({ref.describe()}, origin {ref.origin}); give the map written with this segmentation.")
    current = np.asarray(seg.mask) > 0
    fingerprint = MaskFingerprint.from_tags(seg.tags)
    if not args.replace:
        if fingerprint is None:
            raise UsageError(f"'{seg.name}' carries no fingerprint of the mask textseg wrote, so a hand edit cannot "
                             "be ruled out; pass --replace to rebuild it from the map anyway.")
        if edited_since(fingerprint, current):
            raise UsageError(f"'{seg.name}' was edited since the model made it ({int(current.sum())} voxels now, "
                             f"{fingerprint.voxels} written); pass --replace to discard the edit and rebuild it from "
                             "the map.")

    q = prob.array
    dropped = seg.tags.get(TAG_PREFIX + "dropped") == "true" and not args.keep_absent
    mask = np.zeros(q.shape, bool) if dropped else rethreshold(q, threshold)
    existence = _number(seg.tags.get(TAG_PREFIX + "existence"))
    conf = confidence(q, mask, threshold, existence, band)
    tags = dict(seg.tags)
    tags.setdefault(TAG_PREFIX + "original_threshold", tags.get(TAG_PREFIX + "threshold", "null"))
    tags.update(confidence_tags(conf))
    tags.update(MaskFingerprint.of(mask).tags())
    segments[index] = Segment(seg.name, mask.astype(np.uint8), seg.color, seg.terminology, tags)
    if args.uncertain:
        name = f"{seg.name} uncertain"
        review = Segment(name, uncertain_mask(q, threshold, band).astype(np.uint8), None, None,
                         {TAG_PREFIX + "uncertain_of": seg.name, TAG_PREFIX + "threshold": json.dumps(threshold),
                          TAG_PREFIX + "confidence.band": json.dumps(band)})
        old = [n for n, s in enumerate(segments) if s.name == name]
        if old and segments[old[0]].tags.get(TAG_PREFIX + "uncertain_of") != seg.name:
            raise UsageError(f"{src} already has a segment '{name}' that textseg did not make; rename it first.")
        if old:
            segments[old[0]] = review
        else:
            segments.insert(index + 1, review)
    write_seg_nrrd(out, ref, moved_references(segments, src, out, args.probabilities), overwrite=bool(args.overwrite))
    if not args.quiet:
        mean = "-" if conf["mean"] is None else f"{conf['mean']:.3f}"
        near = "-" if conf["near_threshold"] is None else f"{conf['near_threshold']:.3f}"
        print(f"wrote {out}\n  {seg.name}: {int(current.sum())} -> {conf['voxel_count']} voxels at threshold "
              f"{threshold:g} (mean probability {mean}, near threshold {near})"
              + (" (the existence test dropped it: empty; --keep-absent keeps it)" if dropped else ""),
              file=sys.stdout)
    return 0


def _number(text):
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("rethreshold", help="rebuild an AI segment from its kept probability map at a new threshold")
    p.add_argument("segmentation", help=".seg.nrrd written by `textseg segment --probabilities DIR`")
    p.add_argument("--segment", "-s", required=True, help="name of the segment to rebuild")
    p.add_argument("--threshold", "-t", required=True, help="new probability threshold, 0..1")
    p.add_argument("--probabilities", metavar="DIR",
                   help="folder holding the map (default: the file the segment's textseg.probability_file tag "
                        "names, relative to the segmentation)")
    p.add_argument("--replace", action="store_true",
                   help="rebuild the segment even if it was edited by hand since the model made it")
    p.add_argument("--keep-absent", action="store_true",
                   help="rebuild a segment the existence test dropped (empty) from its map anyway")
    p.add_argument("--uncertain", action="store_true",
                   help="also add (or update) a segment '<name> uncertain': voxels near the threshold (the band)")
    p.add_argument("--band", type=float, help="half-width of the band around the threshold (default 0.1)")
    p.add_argument("--out", "-o", help="write the result here (.seg.nrrd); default: refuse unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists, or without --out the input segmentation itself")
    p.set_defaults(func=cmd_rethreshold)
    return p
