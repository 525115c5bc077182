"""The ``mcs`` command line: operator tools for domains on this host."""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def _usage_error(command: str, message: str) -> int:
    """Bad input: one line on stderr, exit status 2 (as argparse does)."""
    print(f"mcs {command}: error: {message}", file=sys.stderr)
    return 2


def _cmd_status(args: argparse.Namespace) -> int:
    from mcs.bootstrap import validate_domain
    from mcs.status import domain_status, format_status

    try:
        validate_domain(args.domain)
    except ValueError as exc:
        return _usage_error("status", str(exc))
    if not args.interval > 0:
        return _usage_error("status", "--interval must be a positive number of seconds")
    while True:
        status = domain_status(args.domain)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            if args.watch:
                print("\033[H\033[2J", end="")
            print(format_status(status))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.interval)


def _cmd_fault_poison(args: argparse.Namespace) -> int:
    from mcs.poison import check_target, poison

    if args.master == (args.slot is not None):
        return _usage_error("fault poison", "give exactly one of --master or --slot N")
    try:
        check_target(args.domain, args.component, args.slot)
    except ValueError as exc:
        return _usage_error("fault poison", str(exc))
    ident = poison(args.domain, args.component, slot=args.slot)
    print(f"poisoned {ident}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gc = sub.add_parser("gc", help="remove bootstrap objects of domains with no live member")
    gc.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(func=_cmd_gc)
    st = sub.add_parser("status", help="generation, master and members of a domain")
    st.add_argument("--domain", required=True, help="domain name")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=float, default=0.5, help="refresh period for --watch (s)")
    st.set_defaults(func=_cmd_status)
    fault = sub.add_parser("fault", help="fault injection into a live domain (tests, chaos)")
    fsub = fault.add_subparsers(dest="fault_command", required=True, metavar="FAULT")
    po = fsub.add_parser("poison", help="poison a section: dummy bytes, failed flag, counter")
    po.add_argument("--domain", required=True)
    po.add_argument("--component", required=True, help="component name, e.g. registry")
    po.add_argument("--master", action="store_true", help="poison the master area")
    po.add_argument("--slot", type=int, help="poison the contribution of member SLOT")
    po.set_defaults(func=_cmd_fault_poison)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (McsError, OSError) as exc:  # one line, never a traceback
        command = " ".join(filter(None, (args.command, getattr(args, "fault_command", None))))
        print(f"mcs {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
