"""The one value object that every delivery produces: what later accounting sinks consume.

One `DeliveryEvent` per upstream leg of a message (kind "leg") and one for the message as the
client saw it (kind "message"). Text logs, counters and statistics are all derived from these.
"""

from __future__ import annotations

import time

import attrs


def _fmt_list(values: tuple[str, ...]) -> str:
    return ",".join(f"<{v}>" for v in values) or "-"


@attrs.frozen
class DeliveryEvent:
    kind: str  # "leg" or "message"
    session_id: str
    message_id: str  # the transaction id used in the Received header
    client_ip: str
    helo: str
    mail_from: str
    recipients: tuple[str, ...]
    destination: str  # "host:port" of the leg that answered (kind "leg"); "-" for "message"
    route: str  # the destination group ("a|b"), or all groups for "message"
    size: int  # message bytes sent to this leg / received from the client
    code: int  # final reply code (upstream's for a leg, the client's for the message)
    reply: str  # reply text, for the log
    stage: str  # where it ended: "end-of-data", "data", "rcpt", "body", ...
    duration: float  # seconds from DATA to the final reply
    time: float = attrs.field(factory=time.time)

    def to_log_line(self) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time))
        stamp += f".{int(self.time * 1000) % 1000:03d}Z"
        reply = self.reply.replace("\n", " ").replace('"', "'")
        return (
            f"{stamp} {self.kind} session={self.session_id} id={self.message_id}"
            f" client={self.client_ip} helo={self.helo or '-'} from=<{self.mail_from}>"
            f" to={_fmt_list(self.recipients)} dest={self.destination} route={self.route or '-'}"
            f" size={self.size} code={self.code} stage={self.stage}"
            f" duration={self.duration:.3f} reply=\"{reply}\""
        )
