"""The ``mcs`` command line: operator tools for domains on this host."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from mcs.errors import McsError

__all__ = ["main"]


def _cmd_gc(args: argparse.Namespace) -> int:
    from mcs.gc import collect

    results = collect(dry_run=args.dry_run)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    elif not results:
        print("no mcs bootstrap objects on this host")
    else:
        width = max(len(r.domain) for r in results)
        for r in results:
            print(f"{r.domain:<{width}}  {r.action:<12}  {r.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gc = sub.add_parser("gc", help="remove bootstrap objects of domains with no live member")
    gc.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(func=_cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except McsError as exc:
        print(f"mcs {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
