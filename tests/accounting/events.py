"""DeliveryEvents as a session emits them, for feeding sinks directly in tests."""

from __future__ import annotations

import time

from moxy.accounting.events import DESTINATION_REFUSED, DeliveryEvent

SENDER = "alice@example.net"
CLIENT = "192.0.2.7"


def leg(
    destination: str,
    recipients: tuple[str, ...],
    size: int,
    code: int = 250,
    *,
    node: str = "n1",
    sender: str = SENDER,
    client_ip: str = CLIENT,
    when: float | None = None,
) -> DeliveryEvent:
    """One copy sent to `destination` carrying `size` bytes, answered with `code`."""
    return DeliveryEvent(
        kind="leg", session_id="s1", message_id="m1", client_ip=client_ip, helo="client.test",
        mail_from=sender, recipients=recipients, destination=destination,
        route=destination, size=size, code=code, reply=f"{code} ok", stage="end-of-data",
        duration=0.1, node=node, time=time.time() if when is None else when,
    )


def refused(
    recipient: str, *, destination: str = "-", reason: str = DESTINATION_REFUSED,
    node: str = "n1",
) -> DeliveryEvent:
    return DeliveryEvent(
        kind="refused", session_id="s1", message_id="", client_ip=CLIENT, helo="client.test",
        mail_from=SENDER, recipients=(recipient,), destination=destination, route="",
        size=0, code=550, reply="550 no", stage="rcpt", duration=0.0, node=node, reason=reason,
    )


def message(recipients: tuple[str, ...], size: int) -> DeliveryEvent:
    return DeliveryEvent(
        kind="message", session_id="s1", message_id="m1", client_ip=CLIENT, helo="client.test",
        mail_from=SENDER, recipients=recipients, destination="-", route="", size=size,
        code=250, reply="250 ok", stage="end-of-data", duration=0.1, node="n1",
    )
