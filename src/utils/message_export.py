"""The local history of what the station measured: the daily archive files,
then the queued messages not archived yet, filtered by time, variant and key,
streamed (a year of archive never sits in memory) and written as a table, CSV
or JSONL. Called by `ivy messages`."""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
from collections import deque
from collections.abc import Iterator
from typing import IO, Any, Literal

from src import constants

from .functions import dated_files_between
from .messaging_agent import MessagingAgent

Format = Literal["table", "csv", "jsonl"]
# a crash between an archive append and its commit repeats that batch: the
# repeats are close to the original, so a window of recent identifiers is
# enough to drop them without remembering a year of identifiers
_DEDUPLICATION_WINDOW = 20_000


def archived_lines(since: float | None, until: float | None) -> Iterator[str]:
    """The archive's lines of the days that [since, until] touches, then the
    queued messages not archived yet, in order."""
    for path in dated_files_between(constants.MESSAGE_ARCHIVE_DIR, ".jsonl", since, until):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f
    if os.path.exists(constants.MESSAGE_QUEUE_PATH):
        agent = MessagingAgent()
        try:
            yield from agent.unarchived_lines(
                since if since is not None else 0.0, until if until is not None else 2.0**40
            )
        finally:
            agent.close()


# how the archive writer starts every line: the fields a filter needs can be
# read without parsing the whole line
_LINE_HEAD = re.compile(
    r'^\{"identifier":"([^"]+)","timestamp":([0-9.e+-]+),"config_revision":-?\d+,'
    r'"body":\{"variant":"(\w+)"'
)


def _head_of(line: str) -> tuple[str, float, str] | None:
    """(identifier, timestamp, variant) of an archive line, None if torn."""
    match = _LINE_HEAD.match(line)
    if match is not None:
        return match[1], float(match[2]), match[3]
    try:  # written by another version, or by hand
        message = json.loads(line)
        return str(message["identifier"]), float(message["timestamp"]), message["body"]["variant"]
    except (ValueError, KeyError, TypeError):
        return None


def select_messages(
    since: float | None = None,
    until: float | None = None,
    variant: str | None = None,
    key: str | None = None,
) -> Iterator[str]:
    """The archive lines (JSON, no newline) of the archived and queued
    messages in [since, until], of `variant`, holding data `key`; torn lines
    (a power loss mid-write) and repeats are skipped."""
    recent: deque[str] = deque()
    seen: set[str] = set()
    for raw in archived_lines(since, until):
        line = raw.rstrip("\n")
        head = _head_of(line)
        if head is None:
            continue
        identifier, timestamp, kind = head
        if (since is not None and timestamp < since) or (until is not None and timestamp > until):
            continue
        if variant is not None and kind != variant:
            continue
        if key is not None and (kind != "data" or f'"{key}":' not in line):
            continue  # cheap first look; the exact check follows
        if key is not None and key not in json.loads(line)["body"]["data"]:
            continue
        if identifier in seen:
            continue
        seen.add(identifier)
        recent.append(identifier)
        if len(recent) > _DEDUPLICATION_WINDOW:
            seen.discard(recent.popleft())
        yield line


def _rows(message: dict[str, Any], key: str | None) -> Iterator[tuple[str, str, str, str, str]]:
    """(time, identifier, variant, key, value) rows of one message: one per
    data value, one for a log or a config answer."""
    stamp = datetime.datetime.fromtimestamp(message["timestamp"], datetime.timezone.utc)
    when = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = message["body"]
    identifier = message["identifier"]
    variant = body.get("variant", "?")
    if variant == "data":
        for name, value in body.get("data", {}).items():
            if key is None or name == key:
                yield when, identifier, variant, name, json.dumps(value)
    elif variant == "log":
        text = f"{body.get('subject', '')}" + (f": {body['body']}" if body.get("body") else "")
        yield when, identifier, variant, str(body.get("level", "")), text
    elif variant == "config":
        text = f"revision {body.get('config_revision')}" + (
            f": {body['reason']}" if body.get("reason") else ""
        )
        yield when, identifier, variant, str(body.get("status", "")), text
    else:
        yield when, identifier, variant, "", json.dumps(body)


def write_messages(
    lines: Iterator[str], output: IO[str], form: Format, key: str | None = None
) -> int:
    """Write selected archive lines as they come; return how many."""
    count = 0
    if form == "jsonl":
        for line in lines:
            output.write(line + "\n")
            count += 1
        return count
    writer = csv.writer(output, lineterminator="\n") if form == "csv" else None
    if writer is not None:
        writer.writerow(("time", "identifier", "variant", "key", "value"))
    else:
        output.write(f"{'TIME (UTC)':<25}{'VARIANT':<8}{'KEY':<24}VALUE\n")
    for line in lines:
        count += 1
        for when, identifier, variant, name, value in _rows(json.loads(line), key):
            if writer is not None:
                writer.writerow((when, identifier, variant, name, value))
            else:
                output.write(f"{when:<25}{variant:<8}{name:<24}{value}\n")
    return count
