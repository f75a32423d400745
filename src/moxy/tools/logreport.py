"""moxylogalyze's output: the summary, the totals per group and the messages (`-v`), each as
an aligned table, CSV (a header row first) or JSON (one document)."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable
from typing import Any, TextIO

from moxy.accounting.events import DeliveryEvent
from moxy.tools.logstats import JoinedMessage, Listing, Summary

FORMATS = ("table", "csv", "json")
GROUP_COLUMNS = ("messages", "bytes", "recipients", "refused", "failed")


def stamp(when: float) -> str:
    """UTC to the millisecond, as the log writes it."""
    ms = round(when * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _table(rows: list[list[str]], right: set[int], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.write("  ".join(cells).rstrip() + "\n")


def _csv(rows: Iterable[Iterable[Any]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)


def _json(document: Any, out: TextIO) -> None:
    json.dump(document, out, indent=2, ensure_ascii=False)
    out.write("\n")


# --- the summary -----------------------------------------------------------------------------


def summary_fields(s: Summary) -> dict[str, Any]:
    return {
        "first": stamp(s.first) if s.first is not None else None,
        "last": stamp(s.last) if s.last is not None else None,
        "messages_accepted": s.messages_accepted,
        "messages_deferred": s.messages_deferred,
        "messages_rejected": s.messages_rejected,
        "bytes_received": s.bytes_received,
        "bytes_delivered": s.bytes_delivered,
        "legs_delivered": s.legs_delivered,
        "legs_failed": s.legs_failed,
        "recipients_accepted": s.recipients_accepted,
        "refused": dict(sorted(s.refused.items())),
        "connections": dict(sorted(s.connections.items())),
        "senders": len(s.senders),
        "client_ips": len(s.clients),
        "destinations": len(s.destinations),
    }


def write_summary(s: Summary, fmt: str, out: TextIO) -> None:
    fields = summary_fields(s)
    if fmt == "json":
        _json(fields, out)
        return
    flat: list[tuple[str, Any]] = []
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.append((key, sum(value.values())))
            flat.extend((f"{key}.{reason}", count) for reason, count in value.items())
        else:
            flat.append((key, "-" if value is None else value))
    if fmt == "csv":
        _csv([("field", "value"), *flat], out)
        return
    labels = {
        "first": "first event", "last": "last event",
        "messages_accepted": "messages accepted", "messages_deferred": "messages deferred (4xx)",
        "messages_rejected": "messages rejected (5xx)", "bytes_received": "bytes received",
        "bytes_delivered": "bytes delivered", "legs_delivered": "legs delivered",
        "legs_failed": "legs failed", "recipients_accepted": "recipients accepted",
        "refused": "recipients refused", "connections": "connections refused/dropped",
        "senders": "distinct senders", "client_ips": "distinct client IPs",
        "destinations": "distinct destinations",
    }  # fmt: skip
    rows = []
    for key, value in flat:
        parent, dot, reason = key.partition(".")
        label = f"  {reason}" if dot else labels[parent]
        rows.append([label + ":", str(value)])
    _table(rows, set(), out)


# --- totals per group ------------------------------------------------------------------------


def write_listing(listing: Listing, top: int | None, fmt: str, out: TextIO) -> None:
    rows = listing.rows()[:top]
    header = (listing.by, *GROUP_COLUMNS)
    values = [(key, *(getattr(totals, c) for c in GROUP_COLUMNS)) for key, totals in rows]
    if fmt == "json":
        _json([dict(zip(header, row, strict=True)) for row in values], out)
    elif fmt == "csv":
        _csv([header, *values], out)
    else:
        _table([list(header)] + [[str(v) for v in row] for row in values], {1, 2, 3, 4, 5}, out)


# --- messages (-v) ---------------------------------------------------------------------------

MESSAGE_COLUMNS = (
    "time", "node", "session", "id", "client", "from", "to", "size", "code", "reply", "legs",
)  # fmt: skip


def _addresses(recipients: tuple[str, ...]) -> str:
    return ",".join(f"<{r}>" for r in recipients) or "-"


def _leg_record(leg: DeliveryEvent) -> dict[str, Any]:
    return {
        "dest": leg.destination, "route": leg.route, "to": list(leg.recipients),
        "size": leg.size, "code": leg.code, "stage": leg.stage, "reply": leg.reply,
    }  # fmt: skip


def message_record(joined: JoinedMessage) -> dict[str, Any]:
    """One message with its legs; without its message line the envelope comes from a leg."""
    e = joined.message or joined.legs[0]
    return {
        "time": stamp(e.time),
        "node": e.node,
        "session": e.session_id,
        "id": e.message_id,
        "client": e.client_ip,
        "from": e.mail_from,
        "to": list(e.recipients) if joined.message else None,
        "size": e.size if joined.message else None,
        "code": e.code if joined.message else None,
        "reply": e.reply if joined.message else None,
        "legs": [_leg_record(leg) for leg in joined.legs],
    }


def message_line(joined: JoinedMessage) -> str:
    """key=value like the log: the message as the client saw it, then `|` and each leg."""
    e = joined.message or joined.legs[0]
    node = f" node={e.node}" if e.node else ""
    head = (
        f"{stamp(e.time)}{node} id={e.message_id or '-'} client={e.client_ip}"
        f" from=<{e.mail_from}>"
    )
    if joined.message:
        head += f" to={_addresses(e.recipients)} size={e.size} code={e.code}"
    else:
        head += " (no message line)"
    legs = [
        f"{leg.destination} code={leg.code} size={leg.size} to={_addresses(leg.recipients)}"
        + ("" if leg.code else f" stage={leg.stage}")
        for leg in joined.legs
    ]
    return " | ".join([head, *legs])


class MessageWriter:
    """Writes messages as they are joined, so -v streams however long the log is."""

    def __init__(self, fmt: str, out: TextIO) -> None:
        self.fmt, self.out = fmt, out
        self.count = 0
        self._csv = csv.writer(out, lineterminator="\n")
        if fmt == "csv":
            self._csv.writerow(MESSAGE_COLUMNS)

    def write(self, joined: JoinedMessage) -> None:
        if self.fmt == "table":
            self.out.write(message_line(joined) + "\n")
        elif self.fmt == "csv":
            record = message_record(joined)
            record["to"] = _addresses(tuple(record["to"] or ()))
            record["legs"] = ";".join(
                f"{leg['dest']} {leg['code']} {leg['size']}" for leg in record["legs"]
            )
            self._csv.writerow("" if v is None else v for v in record.values())
        else:  # a JSON array written element by element
            prefix = "[\n" if self.count == 0 else ",\n"
            text = json.dumps(message_record(joined), ensure_ascii=False)
            self.out.write(prefix + "  " + text)
        self.count += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("[]\n" if self.count == 0 else "\n]\n")
