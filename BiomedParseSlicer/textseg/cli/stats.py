"""`textseg stats`: segment statistics (volume, intensity, shape) of a segmentation to CSV or JSON, with the
model's confidence for the segments whose probability maps were kept (`segment --probabilities`)."""

from __future__ import annotations

import argparse

from .common import Bar


def cmd_stats(args) -> int:
    from ..formats.read_isolated import prestart

    prestart()
    from ..analysis.confidence import band_levels
    from ..analysis.segment_stats import statistics_for_files, write_statistics

    band_levels(0.5, args.band)  # a bad --band is refused before the files are read

    bar = Bar("statistics", args.quiet)
    try:
        rows = statistics_for_files(args.image, args.segmentation, args.labels, progress=bar,
                                    probabilities=args.probabilities, band=args.band)
    finally:
        bar.close()
    write_statistics(rows, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote statistics of {len(rows)} segment(s) to {args.out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="segment statistics (volume, intensity, shape) to CSV/JSON")
    p.add_argument("image")
    p.add_argument("segmentation", help=".seg.nrrd, or a labelmap with --labels")
    p.add_argument("--labels", help="JSON mapping label values to names (for labelmaps)")
    p.add_argument("--probabilities", metavar="DIR",
                   help="folder of the kept probability maps (default: the files the segments' "
                        "textseg.probability_file tags name); adds the confidence columns")
    p.add_argument("--band", type=float, default=0.1,
                   help="half-width of the band around the threshold for confidence_near_threshold (default 0.1)")
    p.add_argument("--out", "-o", required=True, help="stats.csv or stats.json")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_stats)
    return p
