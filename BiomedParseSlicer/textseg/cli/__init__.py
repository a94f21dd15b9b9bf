"""`textseg` command line: segment images (or a cohort folder) from text prompts, statistics, models, the
server, re-thresholding kept maps, corrections. One module per command (``segment``, ``stats``,
``rethreshold``, ``corrections``, ``models``, ``serve``), each with its ``add_parser``.

Exit codes: 0 ok, 1 failed, 2 bad usage, 130 cancelled or aborted (Ctrl-C). Errors are one line that says
what to do; no tracebacks (set TEXTSEG_DEBUG=1 to see them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from .. import __version__
from ..errors import TextsegError
from . import corrections, models, rethreshold, segment, serve, stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textseg", description="Text-prompted medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"textseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    segment.add_parser(sub)
    stats.add_parser(sub)
    rethreshold.add_parser(sub)
    corrections.add_parser(sub)
    models.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TextsegError as exc:
        if os.environ.get("TEXTSEG_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a folder that is a file, read-only or full: the system's reason and the path, one line
        if os.environ.get("TEXTSEG_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; check that the path is a folder you can write to (or a file "
              "you can read) and that the disk has room.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
