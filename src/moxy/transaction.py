"""One mail transaction fanned out over legs: which legs, what the client hears, and when.

The reply rules (docs/semantics.md) live here as pure functions over the legs' answers, so the
decision table is tested cell by cell without sockets. `Transaction` applies them: legs of one
recipient talk concurrently, the body goes to every leg with the slowest pacing the client, and
the end-of-data sequence goes out only when every leg has the whole message.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import trio

from moxy.accounting.events import DESTINATION_REFUSED, DESTINATION_UNAVAILABLE, POLICY
from moxy.lookup.base import DestinationGroup, Route
from moxy.smtp.replies import Reply
from moxy.smtp.value import Value
from moxy.upstream import Envelope, Leg, LegError, UpstreamSettings

logger = logging.getLogger("moxy.transaction")

Outcome = Reply | LegError

COALESCE: Final = 16384  # body bytes gathered before a write to the legs

_CLASS_ORDER: Final = {2: 0, 3: 0, 4: 1, 5: 2}  # worse is larger


def leg_error_reply(exc: LegError) -> Reply:
    """What a client hears for a leg that could not carry on: temporary, but for 8-bit data
    no destination of the leg can take (RFC 6152: not to be sent as it is, and retrying
    cannot help)."""
    if exc.stage == "8bitmime":
        return Reply.make(554, "5.6.3", "Conversion required but not supported: 8-bit data "
                          "for a destination without 8BITMIME")
    if exc.reply is not None and exc.reply.code == 421:
        return Reply.make(451, "4.4.2", f"Destination closing at {exc.stage}; try again later")
    if exc.stage == "busy":  # every alternative at its concurrency cap (destinations.py)
        return Reply.make(451, "4.4.5", "Destination busy; try again later")
    if exc.stage == "down":  # every alternative failed recently: no attempt, no wait
        return Reply.make(451, "4.4.1", "Destination unavailable (recently failed); "
                          "try again later")

    if exc.stage == "local":  # this host out of descriptors, buffers or ports (connection.py)
        return Reply.make(451, "4.3.0", "Temporary local problem; try again later")
    if exc.stage == "tls":  # RFC 3463 X.7.5: cryptographic failure (or TLS not offered)
        return Reply.make(451, "4.7.5", "TLS with destination failed; try again later")
    if exc.stage in ("connect", "greeting", "ehlo", "helo", "xclient"):
        return Reply.make(451, "4.4.1", f"Destination unavailable at {exc.stage}; try again later")
    return Reply.make(451, "4.4.2", f"Destination failed at {exc.stage}; try again later")


def _as_reply(outcome: Outcome, default_enhanced: str) -> Reply:
    """What the client hears of one leg's outcome: a leg failure's own 4xx, or the
    destination's reply with enhanced codes and lines of at most 512 octets."""
    if isinstance(outcome, LegError):
        return leg_error_reply(outcome)
    return outcome.with_enhanced(f"{outcome.klass}{default_enhanced[1:]}").fitted()


DATA_GO: Final = Reply(354, ("End data with <CR><LF>.<CR><LF>",))


def merge_rcpt(outcomes: Sequence[Outcome]) -> Reply:
    """One recipient, several destination groups: the client hears the worst class; among
    replies of that class, the first group's (its own code, enhanced code and text)."""
    if len(outcomes) == 1:  # one group: its reply is the worst and the first
        return _as_reply(outcomes[0], "2.1.5")
    replies = [_as_reply(o, "2.1.5") for o in outcomes]
    worst = max(_CLASS_ORDER.get(r.klass, 2) for r in replies)
    return next(r for r in replies if _CLASS_ORDER.get(r.klass, 2) == worst)


def decide_data(outcomes: Sequence[Outcome]) -> Reply:
    """The DATA command: 354 only when every leg said 354."""
    if len(outcomes) == 1:  # one leg: its refusal as it is, or our own 354
        outcome = outcomes[0]
        if isinstance(outcome, Reply) and outcome.code == 354:
            return DATA_GO
        return _as_reply(outcome, "2.0.0")
    replies = [_as_reply(o, "2.0.0") for o in outcomes]
    if not replies:  # cannot happen (DATA needs an accepted recipient); never accept to nowhere
        return Reply.make(451, "4.3.0", "No destination for this message; try again later")
    if all(r.code == 354 for r in replies):
        return DATA_GO
    return _refusal(replies, accepted_code=354, stage="DATA")


def decide_final(outcomes: Sequence[Outcome], message_id: str) -> Reply:
    """After end-of-data: 250 only when every leg accepted; same-class refusals pass through;
    anything mixed is 451 so the sender retries (a duplicate is possible, a loss is not)."""
    if len(outcomes) == 1:  # one leg: its verdict, accepted or refused, as it is
        return _as_reply(outcomes[0], "2.0.0")
    replies = [_as_reply(o, "2.0.0") for o in outcomes]
    if not replies:
        return Reply.make(451, "4.3.0", "No destination took this message; try again later")
    if all(r.klass == 2 for r in replies):
        if len(replies) == 1:
            return replies[0]
        return Reply.make(250, "2.0.0", f"Ok: {message_id} accepted by {len(replies)} destinations")
    return _refusal(replies, accepted_code=None, stage="end of data")


def _refusal(replies: list[Reply], accepted_code: int | None, stage: str) -> Reply:
    def accepted(r: Reply) -> bool:
        return r.code == accepted_code if accepted_code is not None else r.klass == 2

    refused = [r for r in replies if not accepted(r)]
    if len(refused) == len(replies) and len({r.klass for r in refused}) == 1:
        return refused[0]
    return Reply.make(
        451,
        "4.3.0",
        f"Destinations disagreed at {stage} ({len(replies) - len(refused)} of {len(replies)}"
        " accepted); try again later",
    )


async def gather(calls: Sequence[Callable[[], Awaitable[Reply]]]) -> list[Outcome]:
    """Run calls concurrently; each ends in a Reply or a LegError (other errors propagate)."""
    if len(calls) == 1:  # the usual case: no task, no nursery
        try:
            return [await calls[0]()]
        except LegError as exc:
            return [exc]
    results: list[Outcome | None] = [None] * len(calls)

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except LegError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return [r for r in results if r is not None]


@attrs.frozen
class Refusal:
    """Why `add_recipient` refused a recipient, for accounting: a `reason` of
    moxy.accounting.events and the destination whose answer the client got ("-": none)."""

    reason: str
    destination: str = "-"
    # The destination refused this recipient itself (not the sender: a MAIL refused there, or
    # an envelope it cannot take, is passed on as the answer to every RCPT): an error of the
    # client's towards `limits.errors` when it is a 5xx.
    of_recipient: bool = False


def _refusal_of(reply: Reply, legs: Sequence[Leg], outcomes: Sequence[Outcome]) -> Refusal:
    """The leg whose answer `merge_rcpt` passed on."""
    for leg, outcome in zip(legs, outcomes, strict=True):
        # operator.eq: compiled (setup.py), `==` between Replies would compare identities.
        if operator.eq(_as_reply(outcome, "2.1.5"), reply):
            if isinstance(outcome, LegError):
                return Refusal(DESTINATION_UNAVAILABLE, leg.destination)
            mail = leg.mail_reply
            return Refusal(DESTINATION_REFUSED, leg.destination,
                           mail is not None and mail.klass == 2)
    return Refusal(DESTINATION_REFUSED)


class LegResult(Value):  # one per leg and message: a Value, see moxy.smtp.value
    _fields = ("leg", "destination", "outcome")
    __slots__ = _fields

    def __init__(self, leg: Leg, destination: str, outcome: Outcome) -> None:
        self.leg: Final = leg
        self.destination: Final = destination
        self.outcome: Final = outcome

    def may_have_it(self) -> bool:
        """The destination accepted the message, or may have: its end-of-data sequence went
        out and no refusal came back (no verdict in time, the connection lost, or a 2xx
        followed by words out of step). The client, told otherwise, will send it again."""
        outcome = self.outcome
        if isinstance(outcome, Reply):
            return outcome.klass == 2
        return self.leg.committing and (outcome.reply is None or outcome.reply.klass == 2)


class Transaction:
    """MAIL … RCPT … DATA of one client message, over the session's pool of legs."""

    def __init__(
        self,
        pool: dict[DestinationGroup, Leg],
        settings: UpstreamSettings,
        envelope: Envelope,
        split_destinations: bool = False,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.envelope = envelope
        self.split_destinations = split_destinations
        self.legs: dict[DestinationGroup, Leg] = {}
        self.recipients: list[str] = []
        self.destination_set: frozenset[DestinationGroup] | None = None
        self.refusal: Refusal | None = None  # why the last refused recipient was refused
        self.body_failure: LegError | None = None
        # Per streaming leg, its destination and what became of it once the body failed (the
        # failing leg's error; the others were abandoned with the message), taken before
        # abort() dropped their connections.
        self.body_outcomes: list[tuple[str, LegError]] = []
        self.streaming: list[Leg] = []
        # Body bytes not yet written: small pieces are coalesced so that a small message goes to
        # a leg as one write (header, body and end-of-data sequence together).
        self.pending = bytearray()

    def _leg(self, group: DestinationGroup) -> Leg:
        leg = self.pool.get(group)
        if leg is None:
            leg = self.pool[group] = Leg(group, self.settings)
        if group not in self.legs:
            leg.begin(self.envelope)
            self.legs[group] = leg
        return leg

    async def add_recipient(self, recipient: str, route: Route) -> Reply:
        groups = route.groups
        if len(groups) > 1:
            groups = tuple(dict.fromkeys(groups))  # a group listed twice is one leg
        if (
            self.split_destinations
            and self.destination_set is not None
            and frozenset(groups) != self.destination_set
        ):
            self.refusal = Refusal(POLICY)
            return Reply.make(
                452, "4.5.3", "Recipient has other destinations; send it in a new transaction"
            )
        legs = [self._leg(g) for g in groups]
        if len(legs) == 1:  # the usual case: no task, no partial
            outcome: Outcome
            try:
                outcome = await legs[0].rcpt(recipient)
            except LegError as exc:
                outcome = exc
            outcomes: Sequence[Outcome] = (outcome,)
        else:
            outcomes = await gather([functools.partial(leg.rcpt, recipient) for leg in legs])
        reply = merge_rcpt(outcomes)
        if reply.klass == 2:
            for leg in legs:
                leg.accepted.append(recipient)
            self.recipients.append(recipient)
            if self.destination_set is None:
                self.destination_set = frozenset(groups)
        else:
            self.refusal = _refusal_of(reply, legs, outcomes)
            for leg, result in zip(legs, outcomes, strict=True):
                if isinstance(result, Reply) and result.klass == 2:
                    leg.unaccept(recipient)
        return reply

    @property
    def active_legs(self) -> list[Leg]:
        return [leg for leg in self.legs.values() if leg.accepted]

    async def start_data(self, header: bytes) -> Reply:
        legs = self.active_legs
        if len(legs) == 1:
            outcome: Outcome
            try:
                outcome = await legs[0].data()
            except LegError as exc:
                outcome = exc
            outcomes: Sequence[Outcome] = (outcome,)
        else:
            outcomes = await gather([leg.data for leg in legs])
        reply = decide_data(outcomes)
        if reply.code != 354:
            for leg in legs:
                await leg.abort()
            return reply
        self.streaming = legs
        self.pending[:] = header
        return reply

    async def send(self, data: bytes) -> None:
        """Forward body bytes to every leg; the slowest leg paces the caller. A leg failing
        here fails the message for all legs (none gets the end-of-data sequence).

        Pieces smaller than COALESCE wait in `pending` (bounded by COALESCE plus one chunk)."""
        if self.body_failure is not None or not data:
            return
        pending = self.pending
        if pending:
            if len(pending) + len(data) < COALESCE:
                pending += data
                return
            data = b"".join((pending, data))  # one copy, where bytes(pending + data) made two
            pending.clear()
        elif len(data) < COALESCE:
            pending += data
            return
        for leg in self.streaming:
            try:
                await leg.send_body(data)
            except LegError as exc:
                logger.warning("leg %s failed during data: %s", leg.group, exc)
                await self._body_failed(leg, exc)
                return

    async def finish(self) -> list[LegResult]:
        """End of data from the client: commit on every leg at once (or report the failure)."""
        legs = self.streaming
        tail = bytes(self.pending)
        self.pending.clear()
        if self.body_failure is None:
            # Every leg still quiet, or none commits: a leg that spoke out of turn, closed or
            # reset during the body fails the message for all, as during the body itself; so
            # does 8-bit data in what is left for a leg that takes 7-bit only.
            for leg in legs:
                failure = leg.heard_unasked()
                if failure is None and leg.seven_bit and not tail.isascii():
                    failure = leg.not_7bit()
                if failure is not None:
                    logger.warning("leg %s failed during data: %s", leg.group, failure)
                    await self._body_failed(leg, failure)
                    break
        if self.body_failure is not None:
            return [LegResult(leg, destination, outcome)
                    for leg, (destination, outcome) in zip(legs, self.body_outcomes, strict=True)]
        if len(legs) == 1:  # the usual case: no task, no partial
            leg = legs[0]
            destination = leg.destination  # before finish(), which may drop the connection
            outcome: Outcome
            try:
                outcome = await leg.finish(tail)
            except LegError as exc:
                outcome = exc
            return [LegResult(leg, destination, outcome)]
        destinations = [leg.destination for leg in legs]
        outcomes = await gather([functools.partial(leg.finish, tail) for leg in legs])
        return [
            LegResult(leg, dest, outcome)
            for leg, dest, outcome in zip(legs, destinations, outcomes, strict=True)
        ]

    async def _body_failed(self, failed: Leg, failure: LegError) -> None:
        """`failed` failed during the body: the message fails for every leg, none of which
        gets the end-of-data sequence."""
        self.body_failure = failure
        self.body_outcomes = [
            (leg.destination, failure if leg is failed else LegError(
                failure.stage, leg.destination, f"abandoned: {failure.where} failed"))
            for leg in self.streaming
        ]
        await self.abort()

    async def abort(self) -> None:
        """Drop every leg that is inside DATA: a partial message is never delivered."""
        self.pending.clear()
        for leg in self.legs.values():
            if leg.in_data:  # Leg.abort() does nothing otherwise
                await leg.abort()

    def close(self) -> None:
        for leg in self.legs.values():
            leg.end_transaction()
