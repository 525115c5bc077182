"""The ``mcs`` command line: operator tools for domains on this host, and ``mcs supervise``,
a supervisor for any program (docs/supervise.md).

Every ``--domain`` takes the name the operator knows (the application's, e.g. ``webcache-8080``,
or the full ``webcache-8080.webcache``), resolved in one place: :func:`mcs.names.resolve`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from mcs import names
from mcs.errors import McsError, SupervisorError
from mcs.gc import GcResult, collect, collect_domain
from mcs.pause import MAX_PAUSE, pause_member
from mcs.poison import check_target, poison
from mcs.status import Watch, domain_status, format_status
from mcs.supervise import (Backoff, ReadyMode, RestartIntensity, RestartPolicy, Supervisor,
                           parse_count, parse_seconds)

__all__ = ["main"]


def _cmd_gc(args: argparse.Namespace) -> int:
    results: list[GcResult]
    if args.domain is None:
        if args.component is not None:
            return _usage_error("gc", "--component needs --domain")
        results = collect(dry_run=args.dry_run)
    else:
        try:
            targets = names.resolve(args.domain, args.component)
        except ValueError as exc:
            return _usage_error("gc", str(exc))
        found = (collect_domain(t.full_name, dry_run=args.dry_run) for t in targets)
        results = [r for r in found if r is not None]
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
    if not args.interval > 0:
        return _usage_error("status", "--interval must be a positive number of seconds")
    try:
        targets = names.resolve(args.domain, args.component)
    except ValueError as exc:
        return _usage_error("status", str(exc))
    watch = Watch() if args.watch else None
    while True:
        statuses = [domain_status(t) for t in targets]
        if watch is not None:
            for s in statuses:
                watch.update(s)
        if args.json:  # one object per bootstrap domain; a list when the name has several
            print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=2))
        else:
            if args.watch:
                print("\033[H\033[2J", end="")
            print("\n\n".join(format_status(s, watch) for s in statuses))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.interval)


def _cmd_fault_poison(args: argparse.Namespace) -> int:
    if args.master == (args.slot is not None):
        return _usage_error("fault poison", "give exactly one of --master or --slot N")
    try:
        [target] = names.resolve(args.domain, args.component)  # one: a component is given
        check_target(target.domain, args.component, args.slot)
    except ValueError as exc:
        return _usage_error("fault poison", str(exc))
    ident = poison(target.domain, args.component, slot=args.slot)
    print(f"poisoned {ident}")
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    command = args.command
    seconds = 0.0 if command == "resume" else args.seconds
    if not 0 < seconds <= MAX_PAUSE and command == "pause":
        return _usage_error(command, f"--for must be within 0 .. {MAX_PAUSE:g} seconds")
    if args.pid <= 0:
        return _usage_error(command, "--pid must be a positive process id")
    try:
        targets = names.resolve(args.domain, args.component)
    except ValueError as exc:
        return _usage_error(command, str(exc))
    results = [r for r in (pause_member(t, args.pid, seconds) for t in targets) if r is not None]
    if not results:
        print(f"mcs {command}: error: pid {args.pid} is not a member of "
              + ", ".join(t.full_name for t in targets), file=sys.stderr)
        return 1
    for r in results:
        print(r.describe())
    return 0


def _cmd_supervise(args: argparse.Namespace) -> int:
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    try:
        if not command:
            raise SupervisorError("give the command to supervise after --: "
                                  "mcs supervise -n N -- CMD ARGS...")
        supervisor = Supervisor(
            command, parse_count(args.members, "-n"),
            intensity=RestartIntensity.parse(args.restart_intensity),
            backoff=Backoff.parse(args.backoff), ready=ReadyMode(args.ready),
            ready_timeout=parse_seconds(args.ready_timeout, "--ready-timeout"),
            stop_timeout=parse_seconds(args.stop_timeout, "--stop-timeout", zero=True),
            restart=RestartPolicy(args.restart))
    except SupervisorError as exc:
        return _usage_error("supervise", str(exc))
    return supervisor.run()


_DOMAIN_HELP = ("the domain as started (webcache-8080: each of its components) or a component's "
                "full domain (webcache-8080.webcache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gc = sub.add_parser("gc", help="remove bootstrap objects of domains with no live member")
    gc.add_argument("--domain", help="only this domain (as for status); default: every one")
    gc.add_argument("--component", help="only this component of --domain")
    gc.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(func=_cmd_gc)
    st = sub.add_parser("status", help="generation, master and members of a domain")
    st.add_argument("--domain", required=True, help=_DOMAIN_HELP)
    st.add_argument("--component", help="only this component of the domain, e.g. webcache")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C, with heartbeat rates and a history of joins, "
                    "departures and recoveries")
    st.add_argument("--interval", type=float, default=0.5, help="refresh period for --watch (s)")
    st.set_defaults(func=_cmd_status)
    pa = sub.add_parser("pause", help="maintenance pause of a member: the others never fence "
                        "it (debugger, SIGSTOP) until it resumes or the pause expires")
    re_ = sub.add_parser("resume", help="end a member's maintenance pause")
    for p in (pa, re_):
        p.add_argument("--domain", required=True, help=_DOMAIN_HELP)
        p.add_argument("--component", help="only this component of the domain")
        p.add_argument("--pid", type=int, required=True, help="the member's process id")
        p.set_defaults(func=_cmd_pause)
    pa.add_argument("--for", dest="seconds", type=float, default=300.0,
                    help="how long the pause lasts at most (s, default 300)")
    fault = sub.add_parser("fault", help="fault injection into a live domain (tests, chaos)")
    fsub = fault.add_subparsers(dest="fault_command", required=True, metavar="FAULT")
    po = fsub.add_parser("poison", help="poison a section: dummy bytes, failed flag, counter")
    po.add_argument("--domain", required=True, help=_DOMAIN_HELP)
    po.add_argument("--component", required=True, help="component name, e.g. registry")
    po.add_argument("--master", action="store_true", help="poison the master area")
    po.add_argument("--slot", type=int, help="poison the contribution of member SLOT")
    po.set_defaults(func=_cmd_fault_poison)
    _add_supervise(sub)
    return parser


# The options of `mcs supervise` that take a value: (flags, default, metavar, help). They are
# taken as text and checked by mcs.supervise, so that a bad one is one line, exit status 2.
_SUPERVISE_OPTIONS = [
    (("-n", "--members"), "1", "N", "members"),
    (("--restart-intensity",), "5/10", "MAX/SECONDS",
     "give a slot up after more than MAX crashes within SECONDS"),
    (("--backoff",), "0.1:10", "MIN:MAX", "restart delay: MIN doubled per consecutive crash, "
     "at most MAX; a run of MAX seconds resets it"),
    (("--ready-timeout",), "30", "S",
     "with --ready notify: kill a member not ready within S seconds, a crash"),
    (("--stop-timeout",), "10", "S",
     "on SIGTERM/SIGINT: SIGKILL members still running after S seconds"),
]


def _add_supervise(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser(
        "supervise", help="run N members of a program, restart them with back-off",
        usage="mcs supervise [-n N] [--restart-intensity MAX/SECONDS] [--backoff MIN:MAX] "
              "[--ready {notify,started}] [--ready-timeout S] [--restart {on-failure,always}] "
              "[--stop-timeout S] -- CMD [ARGS...]",
        description="Runs N members of CMD; restarts a crashed one after an exponential "
                    "back-off, gives a slot up when it crashes more than MAX times within "
                    "SECONDS, exits 1 when no slot is left. sd_notify both ways; members get "
                    "SIGTERM if the supervisor dies. See docs/supervise.md.")
    for flags, default, metavar, text in _SUPERVISE_OPTIONS:
        sv.add_argument(*flags, default=default, metavar=metavar,
                        help=f"{text} (default {default})")
    sv.add_argument("--ready", choices=[m.value for m in ReadyMode], default="notify",
                    help="a member is ready when it sends READY=1 on NOTIFY_SOCKET (notify, "
                         "the default) or once started (started)")
    sv.add_argument("--restart", choices=[p.value for p in RestartPolicy], default="on-failure",
                    help="on-failure (default): a clean exit (status 0) ends the slot; always: "
                         "every exit is restarted")
    sv.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="the program to run, after --")
    sv.set_defaults(func=_cmd_supervise)


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
