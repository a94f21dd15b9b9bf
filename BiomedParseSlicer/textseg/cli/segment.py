"""`textseg segment`: one image, a DICOM series, or every case of a cohort folder, from text prompts;
Ctrl-C stops after saving the prompts already completed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import Cancelled, TextsegError, UsageError
from .common import Bar, cancel_on_ctrl_c

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SEG_SUFFIX = ".seg.nrrd"


def _stem(path: Path) -> str:
    name = path.name
    for suf in IMAGE_SUFFIXES + (SEG_SUFFIX,):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.lower().endswith(SEG_SUFFIX)


def _is_dicom_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    for f in list(path.iterdir())[:20]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def cohort_cases(folder: Path) -> list[Path]:
    """Image files and DICOM series folders directly inside ``folder``, sorted by name."""
    cases = [p for p in sorted(folder.iterdir()) if _is_image(p) or _is_dicom_dir(p)]
    if not cases:
        raise UsageError(f"{folder}: no images (NIfTI, NRRD, MHA, PNG/JPEG/TIFF) or DICOM series folders inside.")
    return cases


def _parse_slices(text: Optional[str]):
    if not text:
        return None
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise UsageError(f"--slices takes FIRST:STOP (e.g. 10:40), got '{text}'.") from None


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("Give at least one --prompt TEXT (repeatable) or --prompts-file FILE (one per line).")
    return prompts


def segment_one(predictor, image: Path, out: Path, args, token) -> dict:
    """Segment one image; write .seg.nrrd (+ optional labelmap/stats/DICOM SEG). Returns a summary.

    Every output is checked (exists? can a DICOM SEG be made for this image?) before inference, and
    built in memory before the first file is written, so a failure leaves no partial set of outputs."""
    from ..analysis.confidence import MaskFingerprint
    from ..errors import OutputExistsError
    from ..formats.atomic import check_writable
    from ..formats.images import read_volume
    from ..formats.segments import segments_from_results, write_seg_nrrd

    outputs = [out] + [_derived(getattr(args, key), out, image, suffix) for key, suffix in DERIVED_SUFFIX.items()
                       if getattr(args, key, None)]
    if args.labelmap:
        from ..formats.segments import labels_path

        outputs.append(labels_path(_derived(args.labelmap, out, image, ".nii.gz")))
    if getattr(args, "probabilities", None) and not getattr(args, "recognize", False):
        from ..formats.probability_maps import map_paths

        outputs += map_paths(_prompts(args), _probability_folder(args, image), args.probability_format)
    for path in outputs:  # before spending minutes on inference
        if path.exists() and not args.overwrite:
            raise OutputExistsError(f"{path} already exists; choose another name or pass --overwrite to replace it.")
        check_writable(path)
    volume = read_volume(image)
    for note in volume.metadata.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.dicom_seg:
        from ..formats.dicomseg import check_dicom_seg_reference

        check_dicom_seg_reference(volume)
    bar = Bar(_stem(image), args.quiet)
    try:
        predictor.set_image(volume, args.modality, args.site, _parse_slices(args.slices), progress=bar, cancel=token)
        if getattr(args, "recognize", False):
            results = predictor.recognize(progress=bar, cancel=token)
        else:
            results = predictor.predict(_prompts(args), args.threshold, args.keep_absent, progress=bar, cancel=token)
    finally:
        bar.close()
    for r in results:
        if r.message:
            print(f"  {r.message}", file=sys.stderr)
    segments = segments_from_results(results)
    for seg in segments:  # lets a later re-threshold or review tell a hand edit from the model's mask
        seg.tags.update(MaskFingerprint.of(seg.mask).tags())
    if not segments and getattr(args, "recognize", False) and not token.cancelled:
        from ..errors import ModelError

        raise ModelError(f"{image}: model '{predictor.spec.id}' recognized none of its targets in this image; "
                         "nothing written. Check --modality/--site, or segment with --prompt.")
    if not segments:
        raise Cancelled(f"{image}: cancelled before any prompt completed; nothing written.")
    seg_dataset = None
    if args.dicom_seg:
        from ..formats.dicomseg import build_dicom_seg

        seg_dataset = build_dicom_seg(volume, segments)
    confidences, maps = None, []
    if getattr(args, "probabilities", None):  # after the last step that can refuse: the maps are written here
        confidences, maps = _keep_maps(results, segments, volume, _probability_folder(args, image), out, args)
    rows = None
    if args.stats:
        from ..analysis.segment_stats import compute_statistics

        rows = compute_statistics(volume, segments, confidences=confidences)
    write_seg_nrrd(out, volume, segments, overwrite=args.overwrite)
    if args.labelmap:
        from ..formats.segments import write_labelmap

        labelmap = _derived(args.labelmap, out, image, ".nii.gz")
        write_labelmap(labelmap, volume, _maps_relative_to(segments, maps, labelmap), overwrite=args.overwrite)
    if seg_dataset is not None:
        from ..formats.dicomseg import save_dicom_seg

        save_dicom_seg(seg_dataset, _derived(args.dicom_seg, out, image, ".dcm"), overwrite=args.overwrite)
    if rows is not None:
        from ..analysis.segment_stats import write_statistics

        write_statistics(rows, _derived(args.stats, out, image, ".csv"), overwrite=args.overwrite)
    if getattr(args, "objects", None):
        _write_objects(_derived(args.objects, out, image, ".objects.json"), image, predictor, results, args.overwrite)
    expected = len(results) if getattr(args, "recognize", False) else len(_prompts(args))
    summary = {
        "image": str(image),
        "output": str(out),
        "segments": {r.name: r.voxel_count for r in results},
        "probabilities": [str(m) for m in maps],
        "objects": {r.name: getattr(r, "objects", []) for r in results},
        "complete": len(results) == expected and all(r.complete for r in results),
    }
    return summary


def _probability_folder(args, image: Path) -> Path:
    """Where a case's probability maps go: the --probabilities folder, one subfolder per case in cohort mode."""
    folder = Path(args.probabilities)
    return folder / _stem(image) if getattr(args, "cohort", False) else folder


def _keep_maps(results, segments, volume, folder: Path, out: Path, args) -> tuple[list, list]:
    """Write each result's uint8 map (one prompt's float map in memory at a time where the adapter defers them)
    and tag its segment with the kept answer: threshold, existence, fingerprint, confidence, map file.
    Returns the confidence of each segment (for the statistics) and the map files."""
    from ..analysis.confidence import ModelAnswer
    from ..formats.probability_maps import map_paths, reference_tag, write_probability_map
    from ..formats.segments import TAG_PREFIX

    confidences = []
    paths = map_paths([r.name for r in results], folder, args.probability_format)
    for r, seg, path in zip(results, segments, paths):
        deferred = None if r.probability_ready else r.__dict__.get("_probability")
        answer = ModelAnswer.from_result(r)
        write_probability_map(path, volume, answer.probability, overwrite=args.overwrite)
        seg.tags.update(answer.tags())
        seg.tags.update(reference_tag(path, out))
        if answer.dropped:
            seg.tags[TAG_PREFIX + "dropped"] = "true"
        confidences.append(answer.confidence())
        del answer
        if deferred is not None:  # give the float map back: the adapter computes it again if anyone asks
            r.__dict__["_probability"] = deferred
    return confidences, paths


def _maps_relative_to(segments, maps: list, path: Path) -> list:
    """The segments with their map references relative to ``path`` (a label map written to another folder)."""
    from dataclasses import replace

    from ..formats.probability_maps import reference_tag

    return [replace(s, tags={**s.tags, **reference_tag(m, path)}) for s, m in zip(segments, maps)] if maps else segments


def _write_objects(path: Path, image: Path, predictor, results, overwrite: bool) -> None:
    """Detection JSON: per segment its objects (bounding box and centroid in LPS mm, textseg.detection)."""
    from ..formats.atomic import atomic_output

    doc = {"image": str(image), "model": predictor.spec.id, "space": "LPS", "units": "mm",
           "segments": [{"name": r.name, "existence": r.existence, "objects": getattr(r, "objects", [])}
                        for r in results]}
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))


DERIVED = ("labelmap", "dicom_seg", "stats", "objects")  # options naming an extra output (a folder in cohort mode)
DERIVED_SUFFIX = {"labelmap": ".nii.gz", "dicom_seg": ".dcm", "stats": ".csv", "objects": ".objects.json"}


def _derived(option: str, out: Path, image: Path, suffix: str) -> Path:
    """In cohort mode an option names a folder (made by cmd_segment): <folder>/<case><suffix>, where a suffix in
    the folder's name (e.g. 'stats.json') picks the format; else a file."""
    p = Path(option)
    return p / (_stem(image) + ("".join(p.suffixes) or suffix)) if p.is_dir() else p


def cmd_segment(args) -> int:
    from ..formats.read_isolated import prestart

    prestart()  # the image reader child starts while the model is set up
    from ..predictor import Predictor
    from ..runcontrol import CancelToken

    image = Path(args.image)
    out = Path(args.out)
    token = CancelToken()
    if args.probabilities:
        from ..formats.probability_maps import check_suffix

        args.probability_format = check_suffix(args.probability_format)
        if Path(args.probabilities).exists() and not Path(args.probabilities).is_dir():
            raise UsageError(f"--probabilities names a folder (one map per prompt), but {args.probabilities} is a "
                             "file. Give a folder.")
    if not image.exists():
        raise UsageError(f"{image}: no such file or folder.")
    cohort = args.cohort = image.is_dir() and not _is_dicom_dir(image)
    if cohort and out.name.lower().endswith(SEG_SUFFIX):
        raise UsageError(f"{image} is a cohort folder: --out must be a folder, not a file ({out}).")
    if not cohort and not out.name.lower().endswith(SEG_SUFFIX):
        raise UsageError(f"--out must end with {SEG_SUFFIX} (got {out}).")
    if getattr(args, "recognize", False):
        from ..catalog import get_model

        if args.prompt or args.prompts_file:
            raise UsageError("--recognize finds the model's targets itself; leave out --prompt/--prompts-file.")
        if args.threshold is not None or args.keep_absent:
            raise UsageError("--threshold and --keep-absent apply to --prompt runs; recognition keeps targets by the "
                             "model family's rules (Python: Predictor.recognize(existence_threshold=... for "
                             "BiomedParse v2, p_value_threshold=... for v1)). Leave them out with --recognize.")
        if not get_model(args.model).recognition:
            raise UsageError(f"Model '{args.model}' has no recognition ('segment everything'); give --prompt.")
    if args.server:
        from ..remote.client import RemotePredictor

        if args.device != "auto" or args.batch_size or args.seed is not None:
            raise UsageError("--device, --batch-size and --seed are the server's settings; leave them out with "
                             "--server.")
        predictor = RemotePredictor(args.server, args.model, api_key=args.api_key or os.environ.get("TEXTSEG_API_KEY"),
                                    probabilities="uint8" if args.probabilities else "none")
    else:
        predictor = Predictor(args.model, device=args.device, batch_size=args.batch_size, seed=args.seed)
    if not getattr(args, "recognize", False):
        predictor.check_prompts(_prompts(args))  # fail before spending minutes on inference
    if cohort:  # one file per case: the extra outputs name folders
        for key in DERIVED:
            folder = getattr(args, key, None)
            if not folder:
                continue
            if Path(folder).exists() and not Path(folder).is_dir():
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{image} is a cohort folder: {flag} names a folder (one file per case), but "
                                 f"{folder} is a file. Give a folder.")
            Path(folder).mkdir(parents=True, exist_ok=True)
    with cancel_on_ctrl_c(token, "completed prompts will be saved"):
        if not cohort:
            summary = segment_one(predictor, image, out, args, token)
            _print_summary(summary, args)
            return 0 if summary["complete"] else 1
        return _run_cohort(predictor, image, out, args, token)


def _run_cohort(predictor, folder: Path, out_dir: Path, args, token) -> int:
    """Every case of a folder; resumes where it stopped (existing outputs are skipped)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "cohort.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"cases": {}}
    cases = cohort_cases(folder)
    failed = 0
    for case in tqdm(cases, desc="cohort", unit="case", disable=args.quiet):
        out = out_dir / (_stem(case) + SEG_SUFFIX)
        if out.exists() and not args.overwrite:
            manifest["cases"].setdefault(case.name, {"status": "done", "output": str(out)})
            continue
        if token.cancelled:
            break
        try:
            summary = segment_one(predictor, case, out, args, token)
            manifest["cases"][case.name] = {"status": "done" if summary["complete"] else "partial", **summary}
        except Cancelled as exc:
            manifest["cases"][case.name] = {"status": "cancelled", "error": str(exc)}
            break
        except TextsegError as exc:
            failed += 1
            manifest["cases"][case.name] = {"status": "failed", "error": str(exc)}
            print(f"error: {exc}", file=sys.stderr)
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)
    done = sum(1 for c in manifest["cases"].values() if c["status"] == "done")
    print(f"{done}/{len(cases)} cases done, {failed} failed; manifest: {manifest_path}")
    return 0 if done == len(cases) else 1


def _print_summary(summary: dict, args) -> None:
    if args.quiet:
        return
    print(f"wrote {summary['output']}")
    if summary.get("probabilities"):
        print(f"  probability maps: {Path(summary['probabilities'][0]).parent}")
    for name, n in summary["segments"].items():
        print(f"  {name}: {n} voxels")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("segment", help="segment an image (or every image of a folder) from text prompts")
    p.add_argument("image", help="image file, DICOM series folder, or a folder of cases (cohort)")
    p.add_argument("--prompt", "-p", action="append", help="target to segment, e.g. 'liver' (repeatable)")
    p.add_argument("--prompts-file", help="text file with one prompt per line")
    p.add_argument("--model", "-m", default="deepbet", help="model id (see `textseg models`); default: deepbet")
    p.add_argument("--modality", help="CT, MRI, PET, X-Ray, Ultrasound, ... (default: the model's first)")
    p.add_argument("--site", help="CT body site preset (abdomen, lung, ...)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--slices", help="FIRST:STOP slice range for 2D models (canonical axial slices)")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model's)")
    p.add_argument("--keep-absent", action="store_true", help="keep masks whose existence test failed")
    p.add_argument("--batch-size", type=int, help="slices (2D) or windows (3D) per batch")
    p.add_argument("--seed", type=int, help="seed for models that sample (reproducible results)")
    p.add_argument("--server", help="run on a textseg server (URL) instead of this computer")
    p.add_argument("--api-key", help="the server's API key (default: $TEXTSEG_API_KEY)")
    p.add_argument("--out", "-o", required=True, help="output .seg.nrrd (a folder for a cohort)")
    p.add_argument("--labelmap", help="also write a NIfTI labelmap (+ .labels.json)")
    p.add_argument("--dicom-seg", help="also write DICOM SEG (DICOM series input)")
    p.add_argument("--stats", help="also write segment statistics (.csv or .json)")
    p.add_argument("--probabilities", metavar="DIR",
                   help="also keep the model's probability maps: one uint8 file per prompt (0-255 = 0-1, the input "
                        "grid) in DIR (a subfolder per case in cohort mode), for `textseg rethreshold` and "
                        "confidence statistics")
    p.add_argument("--probability-format", default=".nrrd", metavar="SUFFIX",
                   help="file type of the maps: .nrrd (default), .nii.gz or .nii")
    p.add_argument("--objects", help="also write detection JSON: per object its LPS bounding box and centroid (mm)")
    p.add_argument("--recognize", action="store_true",
                   help="segment everything the model recognizes (models with recognition) instead of --prompt")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_segment)
    return p
