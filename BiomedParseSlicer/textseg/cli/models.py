"""``textseg models list|download|verify|remove|import``: the weights manager on the command line.

``add_parser(subparsers)`` adds the ``models`` verb to the main ``textseg`` parser; the parsed
namespace carries ``func`` (call ``args.func(args)``, it returns the exit code and prints errors as
one line). ``main(argv)`` runs the verb alone: ``main(["download", "biomedparse-v1"])``.
Exit codes: 0 ok, 1 failed (network, checksum, access, disk...), 2 bad usage (unknown model...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .. import weights
from ..catalog import get_model
from ..errors import TextsegError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list, download, verify, remove or import model weights",
                              description="Manage model weights (cache: $TEXTSEG_HOME or ~/.textseg).")
    p.add_argument("--home", metavar="DIR", help="weights cache folder (default: $TEXTSEG_HOME or ~/.textseg)")
    sub = p.add_subparsers(dest="models_command", metavar="{list,download,verify,remove,import}",
                           help="default: list")

    s = sub.add_parser("list", help="models and the state of their files (ready/missing/partial/corrupt/unverified)")
    s.add_argument("--all", action="store_true", help="include hidden test-only models")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("download", help="download, verify and install a model's weights (resumes partial files)")
    s.add_argument("model", nargs="+", help="model id(s)")
    s.add_argument("--token", help="HuggingFace token (default: $HF_TOKEN or `hf auth login`)")
    s.add_argument("--force", action="store_true", help="download again even if verified files are present")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("verify", help="hash the installed files against their checksums; quarantine bad ones")
    s.add_argument("model", nargs="+", help="model id(s)")

    s = sub.add_parser("remove", help="delete a model's downloaded, partial and quarantined files")
    s.add_argument("model", nargs="+", help="model id(s)")

    s = sub.add_parser("import", help="verify and install a file you downloaded yourself (offline sites)")
    s.add_argument("model", help="model id")
    s.add_argument("file", help="the downloaded file (it is copied, never moved or changed)")
    s.add_argument("--name", help="which catalog file it is, when the model has several")

    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``models`` command; errors become one line on stderr and an exit code."""
    try:
        if args.home:
            weights.configure(home=args.home)
        if args.models_command is None:  # plain `textseg models`: the list
            args.models_command, args.all, args.json = "list", False, False
        return _COMMANDS[args.models_command](args)
    except TextsegError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; a partial download is kept and resumes next time", file=sys.stderr)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="textseg")
    add_parser(parser.add_subparsers(dest="command"))
    try:
        args = parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:  # argparse: 0 for --help, 2 for bad usage
        return int(e.code or 0)
    return args.func(args)


# ---- verbs --------------------------------------------------------------------------------------
def _list(args: argparse.Namespace) -> int:
    rows = weights.status_all(include_hidden=args.all)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return 0
    print(f"cache: {weights.home()}")
    for r in rows:
        print(f"{r.model_id:<28} {r.state}")
        for f in r.files:
            size = f" {f.have}/{f.size} bytes" if f.size else f" {f.have} bytes"
            revision = f.revision[:12] if f.revision and weights.is_commit(f.revision) else f.revision
            where = [f"revision {revision}"] if f.revision else []
            where += [f"commit {f.commit[:12]}"] if f.commit else []
            where += [f"sha256 {f.sha256[:16]}"] if f.sha256 else []
            notes = "; ".join(n for n in (f.message, f.note) if n)
            print(f"  {f.name:<26} {f.state}{size}" + "".join(f"  {w}" for w in where)
                  + (f" ({notes})" if notes else ""))
    return 0


class _Bars:
    """One tqdm byte bar per file."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, name: str, done: int, total: Optional[int]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(name)
        if bar is None or (bar.n > done):  # new file, or verifying after downloading
            if bar is not None:
                bar.close()
            bar = self.bars[name] = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=name, file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _download(args: argparse.Namespace) -> int:
    for model in args.model:
        bars = _Bars(args.quiet)
        try:
            folder = weights.download(model, token=args.token, force=args.force, on_bytes=bars)
        finally:
            bars.close()
        print(f"{model}: ready in {folder}")
        for f in weights.status(model).files:
            if f.note:
                print(f"  {f.name}: {f.note}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    failed = False
    for model in args.model:
        st = weights.verify(model)
        print(f"{st.model_id}: {st.state}")
        for f in st.files:
            print(f"  {f.name}: {f.state}" + (f" ({f.message})" if f.message else ""))
        failed |= st.state != weights.READY
    return 1 if failed else 0


def _remove(args: argparse.Namespace) -> int:
    specs = [get_model(m) for m in args.model]  # all ids valid before deleting anything
    for spec in specs:
        removed = weights.remove(spec)
        print(f"{spec.id}: removed {len(removed)} file(s)" + (f" from {removed[0].parent}" if removed else ""))
    return 0


def _import(args: argparse.Namespace) -> int:
    path = weights.import_file(args.model, args.file, name=args.name)
    print(f"{args.model}: imported and verified {path}")
    return 0


_COMMANDS = {"list": _list, "download": _download, "verify": _verify, "remove": _remove, "import": _import}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
