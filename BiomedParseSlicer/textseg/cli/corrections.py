"""`textseg corrections compare|export`: how much people corrected (Dice, HD95, ASD, volume added/removed, slices
touched, per segment pair) and the corrected cases as an nnU-Net v2 raw dataset + MONAI datalist.

Exit codes: 0 done; 1 failed (unreadable input, a grid or overlap refused, an output exists); 2 bad usage;
130 cancelled (Ctrl-C: an export keeps its complete cases and resumes when run again)."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ..errors import Cancelled, InputError, OutputExistsError, UsageError
from .common import Bar, cancel_on_ctrl_c

CANCELLED_EXIT = 130


# ---- compare -------------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from ..analysis.corrections import compare_segmentations, write_rows
    from ..runcontrol import CancelToken

    for path in (args.a, args.b):
        if not Path(path).exists():
            raise InputError(f"{path}: no such file or folder.")
    if args.out:
        if Path(args.out).suffix.lower() not in (".csv", ".json"):
            raise UsageError(f"--out {args.out}: write the comparison as .csv or .json.")
        if Path(args.out).exists() and not args.overwrite:
            raise OutputExistsError(f"{args.out} already exists; choose another name or pass --overwrite to replace "
                                    "it.")
    token = CancelToken()
    bar = Bar("compare", args.quiet)
    try:
        with cancel_on_ctrl_c(token, "the comparison stops after the current segment"):
            rows = compare_segmentations(args.a, args.b, labels_a=args.labels_a, labels_b=args.labels_b,
                                         slice_axis=args.slice_axis, progress=bar, cancel=token)
    except Cancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return CANCELLED_EXIT
    finally:
        bar.close()
    hows = {r.get("matched_by") for r in rows}
    if hows == {"only in A", "only in B"}:  # both sides have segments, none paired
        print("note: no segment of A matched one of B (by name, prompt or terminology), so nothing was compared; "
              "name a label map's labels with --labels-a/--labels-b (a labels JSON) as the other side names them.",
              file=sys.stderr)
    if args.out:
        write_rows(args.out, rows, overwrite=args.overwrite)
        if not args.quiet:
            print(f"wrote the comparison of {len(rows)} segment pair(s) to {args.out}")
    else:
        _print_table(rows)
    return 0


def _print_table(rows) -> None:
    """The main columns as CSV on stdout (pipe-friendly; --out writes every column)."""
    keys = ["segment_a", "segment_b", "matched_by", "dice", "hd95_mm", "asd_mm", "added_ml", "removed_ml",
            "slices_touched"]
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(keys)
    for r in rows:
        w.writerow(["" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in keys])


# ---- export ----------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from ..formats.training_sets import FILE_ENDINGS, dataset_folder_name, export_nnunet
    from ..runcontrol import CancelToken

    try:  # a bad id or name is bad usage, refused before any case is read
        dataset_folder_name(args.dataset_id, args.name)
    except InputError as exc:
        raise UsageError(str(exc)) from None

    if args.file_ending not in FILE_ENDINGS:
        raise UsageError(f"--file-ending {args.file_ending}: choose one of {', '.join(FILE_ENDINGS)}.")
    if bool(args.case) == bool(args.cohort):
        raise UsageError("Give the cases as --case IMAGE SEGMENTATION (repeatable) or --cohort FOLDER|CSV, "
                         "not both and not neither.")
    cases = _cases_from_pairs(args.case) if args.case else _cases_from_cohort(Path(args.cohort), args.segmentations)
    token = CancelToken()
    bar = Bar("export", args.quiet)
    try:
        with cancel_on_ctrl_c(token, "the export stops after the current case; run again to finish"):
            result = export_nnunet(cases, args.nnunet, args.dataset_id, args.name, args.labels, args.channel,
                                   file_ending=args.file_ending, overlap=args.overlap, overwrite=args.overwrite,
                                   progress=bar, cancel=token)
    finally:
        bar.close()
    done = len(result.written) + len(result.skipped)
    if result.cancelled:
        print(f"cancelled: {done} of {len(cases)} cases complete in {result.dataset_dir}; run the same command "
              "again to finish.", file=sys.stderr)
        return CANCELLED_EXIT
    if not args.quiet:
        print(f"wrote {result.dataset_dir}: {len(result.written)} case(s) written, {len(result.skipped)} already "
              f"complete\n  nnU-Net: {result.dataset_json}\n  MONAI datalist: {result.datalist_json}")
        for cid, rec in result.records.items():
            if rec.get("ignored_segments"):
                print(f"  {cid}: segments not among --labels, left out: {', '.join(rec['ignored_segments'])}")
    return 0


def _cases_from_pairs(pairs):
    from ..formats.training_sets import TrainingCase

    cases = []
    for image, seg in pairs:
        for p in (image, seg):
            if not Path(p).exists():
                raise InputError(f"{p}: no such file or folder (--case IMAGE SEGMENTATION).")
        cases.append(TrainingCase(Path(image), Path(seg)))
    return cases


def _cases_from_cohort(cohort: Path, segmentations):
    """A CSV (columns image, segmentation, optional case_id and labels; paths relative to the CSV), or a folder
    of images whose segmentations are ``<case>.seg.nrrd`` in ``segmentations`` (default: the same folder,
    e.g. the --out folder of a `textseg segment` cohort run after correction)."""
    from ..formats.training_sets import TrainingCase
    from .segment import SEG_SUFFIX, _stem, cohort_cases

    if not cohort.exists():
        raise InputError(f"{cohort}: no such folder or CSV file (--cohort).")
    if cohort.is_file():
        if cohort.suffix.lower() != ".csv":
            raise UsageError(f"--cohort {cohort}: give a folder or a .csv with columns image,segmentation.")
        try:
            rows = list(csv.DictReader(cohort.open(newline="")))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{cohort}: not a readable CSV ({exc}).") from None
        if not rows or not {"image", "segmentation"} <= set(rows[0]):
            raise InputError(f"{cohort}: needs a header with the columns image,segmentation (optional case_id, "
                             "labels) and one row per case.")
        cases = []
        for n, r in enumerate(rows, start=2):
            image, seg = (cohort.parent / (r.get(k) or "").strip() for k in ("image", "segmentation"))
            for p in (image, seg):
                if not p.exists() or p == cohort.parent:
                    raise InputError(f"{cohort}, line {n}: {p} does not exist; fix the path (relative to the CSV).")
            labels = (r.get("labels") or "").strip()
            cases.append(TrainingCase(image, seg, (r.get("case_id") or "").strip() or None,
                                      cohort.parent / labels if labels else None))
        return cases
    seg_dir = Path(segmentations) if segmentations else cohort
    images = cohort_cases(cohort)
    missing = [p.name for p in images if not (seg_dir / (_stem(p) + SEG_SUFFIX)).is_file()]
    if missing:
        raise InputError(f"{len(missing)} case(s) of {cohort} have no <case>{SEG_SUFFIX} in {seg_dir} (first: "
                         f"{missing[0]}); give the corrected segmentations' folder with --segmentations, or list the "
                         "pairs in a CSV.")
    return [TrainingCase(p, seg_dir / (_stem(p) + SEG_SUFFIX)) for p in images]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("corrections", help="measure corrections (compare) and export corrected cases (export)")
    csub = p.add_subparsers(dest="corrections_command", metavar="ACTION")
    c = csub.add_parser("compare", help="compare two segmentations segment by segment (A: model output, "
                                        "B: corrected): Dice, HD95, ASD, volume added/removed, slices touched")
    c.add_argument("a", help="segmentation A (.seg.nrrd, DICOM SEG or label map)")
    c.add_argument("b", help="segmentation B, on A's grid (or the same lattice with another extent)")
    c.add_argument("--labels-a", help="labels JSON of A when A is a label map")
    c.add_argument("--labels-b", help="labels JSON of B when B is a label map")
    c.add_argument("--slice-axis", choices=("i", "j", "k"), default="k",
                   help="index axis along which slices_touched counts slices (default k)")
    c.add_argument("--out", "-o", help="table.csv or table.json (default: the main columns on stdout)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    e = csub.add_parser("export", help="write corrected cases as an nnU-Net v2 raw dataset and a MONAI datalist")
    e.add_argument("--nnunet", required=True, metavar="OUT",
                   help="folder that holds the dataset (nnUNet_raw): Dataset<ID>_<NAME> is made inside")
    e.add_argument("--dataset-id", required=True, type=int, help="nnU-Net dataset id, 1..999")
    e.add_argument("--name", required=True, help="dataset name (letters, digits, '_', '-')")
    e.add_argument("--labels", required=True, nargs="+", metavar="LABEL",
                   help="segment names in label order (label 1, 2, ...; background is 0)")
    e.add_argument("--channel", required=True, help="the image's channel name: CT (nnU-Net's CT normalisation), "
                                                    "MRI, PET, ...")
    e.add_argument("--case", nargs=2, action="append", metavar=("IMAGE", "SEGMENTATION"),
                   help="one (image, corrected segmentation) pair (repeatable)")
    e.add_argument("--cohort", metavar="FOLDER|CSV",
                   help="a folder of images with <case>.seg.nrrd beside them (or in --segmentations), or a CSV "
                        "with columns image,segmentation[,case_id,labels] relative to it")
    e.add_argument("--segmentations", metavar="DIR", help="with a --cohort folder: where the <case>.seg.nrrd are")
    e.add_argument("--file-ending", default=".nii.gz", help=".nii.gz (default), .nrrd or .mha")
    e.add_argument("--overlap", choices=("refuse", "later-wins"), default="refuse",
                   help="voxels in two labelled segments: refuse (default) or give them the later label")
    e.add_argument("--overwrite", action="store_true",
                   help="replace files that differ from what would be written (never needed to resume)")

    def run(args) -> int:
        if args.corrections_command == "compare":
            return cmd_compare(args)
        if args.corrections_command == "export":
            return cmd_export(args)
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=run)
    return p
