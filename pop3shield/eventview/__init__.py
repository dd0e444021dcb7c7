"""``pop3shield events FILE...``: the operator's view of the security event file.

Modules: :mod:`.reader` (files, gzip, malformed lines, progress), :mod:`.filters` (time range,
protection, source, user), :mod:`.aggregate` (bounded counters), :mod:`.terminal` (text),
:mod:`.report` (``--html``), :mod:`.follow` (``--follow`` across rotation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import deque
from typing import IO, Any

from pop3shield.eventview.aggregate import Aggregate
from pop3shield.eventview.filters import Filter, parse_source, parse_when
from pop3shield.eventview.reader import Progress, Reader, Record, parse_line

__all__ = ["add_arguments", "main", "Aggregate", "Filter", "Reader"]


def _when(text: str) -> float:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _source(text: str) -> Any:
    try:
        return parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="event files (events.path), oldest first; .gz rotations are read as they are")
    parser.add_argument("--since", type=_when, metavar="TIME",
                        help="from this time: ISO 8601 (UTC unless it has an offset) or 30m, 1h, 2d ago")
    parser.add_argument("--until", type=_when, metavar="TIME", help="up to this time (same forms)")
    parser.add_argument("--protection", action="append", default=[], metavar="NAME",
                        help="only this protection (repeat, or comma-separated, for several)")
    parser.add_argument("--source", action="append", default=[], type=_source, metavar="ADDRESS",
                        help="only clients in this address or CIDR network (repeatable)")
    parser.add_argument("--user", action="append", default=[], metavar="USER", help="only this user (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="the summary as one JSON object; with --follow, the matching records as JSON lines")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="print the latest matching records, then new ones as the last FILE grows "
                             "(across rotation)")
    parser.add_argument("--html", metavar="REPORT", help="also write a self-contained HTML report to REPORT")
    parser.add_argument("--top", type=_positive, default=10, metavar="N", help="top N sources and users (10)")
    parser.add_argument("--latest", type=_positive, default=None, metavar="N",
                        help="latest events in the HTML report (50) or shown first by --follow (10)")
    parser.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)


def _filter(args: argparse.Namespace) -> Filter:
    protections = [p.strip() for item in args.protection for p in item.split(",") if p.strip()]
    return Filter(since=args.since, until=args.until, protections=protections, sources=args.source,
                  users=args.user)


def _fail(message: str) -> int:
    print(f"pop3shield: {message}", file=sys.stderr, flush=True)
    return 2


def main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out if out is not None else sys.stdout
    for path in args.files:
        if not os.path.isfile(path) and not (args.follow and path == args.files[-1]):
            return _fail(f"{path}: not a readable file")
    try:
        if args.follow:
            return _follow(args, _filter(args), out)
        return _summarise(args, _filter(args), out)
    except BrokenPipeError:  # `| head`: the reader has seen enough; nothing more to flush at exit
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    except OSError as exc:
        return _fail(f"{exc.filename or 'events'}: cannot read: {exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130


def _summarise(args: argparse.Namespace, selection: Filter, out: IO[str]) -> int:
    from pop3shield.eventview import terminal

    reader = Reader(Progress())
    agg = Aggregate(latest=args.latest or 50, top=args.top)
    agg.extend(record for record in reader.records(list(args.files)) if selection.matches(record))
    agg.malformed = reader.malformed
    if args.html:
        from pop3shield.eventview.report import render

        text = render(agg, args.files, top=args.top)
        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(text)
    if args.json:
        json.dump(agg.as_json(), out, ensure_ascii=True, separators=(",", ":"))
        out.write("\n")
    else:
        terminal.summary(agg, out, top=args.top)
    out.flush()
    return 0


def _follow(args: argparse.Namespace, selection: Filter, out: IO[str]) -> int:
    from pop3shield.eventview.follow import Follower
    from pop3shield.eventview.terminal import record_line

    reader = Reader(Progress())
    latest: deque[Record] = deque(maxlen=args.latest or 10)
    for path in args.files[:-1]:
        latest.extend(record for record in reader.file(path) if selection.matches(record))
    try:
        follower = Follower(args.files[-1], reader._bad)
    except ValueError as exc:
        return _fail(str(exc))

    def show(record: Record) -> None:
        if args.json:
            out.write(json.dumps(record.data, ensure_ascii=True, separators=(",", ":")) + "\n")
        else:
            out.write(record_line(record.data) + "\n")

    def records(lines: list[bytes]) -> list[Record]:
        found = []
        for line in lines:
            if not line.strip():
                continue
            record = parse_line(line)
            if record is None:
                reader.malformed += 1
            elif selection.matches(record):
                found.append(record)
        return found

    latest.extend(records(follower.poll()))
    for record in latest:
        show(record)
    out.flush()
    try:
        while True:
            time.sleep(args.interval)
            new = records(follower.poll())
            for record in new:
                show(record)
            if new:
                out.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        follower.close()
