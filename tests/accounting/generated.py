"""DeliveryEvents generated for the C loops' tests (test_loglines.py, test_speedups.py): any
fields, and fields as sessions hand them over."""

from __future__ import annotations

from hypothesis import strategies as st

from moxy.accounting.events import DeliveryEvent

BASE = DeliveryEvent(
    kind="leg", session_id="S1", message_id="S1.1", client_ip="192.0.2.7", helo="c.test",
    mail_from="s@c.test", recipients=("a@x.test",), destination="127.0.0.1:2525",
    route="127.0.0.1:2525", size=120, code=250, reply="2.0.0 Ok: queued as 4F", stage="end-of-data",
    duration=0.0123, node="n1", reason="", tls="", time=1_764_000_000.25,
)

# Any text, UTF-8 or not (lone surrogates: what surrogateescape makes of bad bytes), quotes
# and line breaks included.
text = st.text(st.characters(), max_size=12)
plain = st.text(st.characters(codec="utf-8"), max_size=12)
anything = text | st.just("")
times = (st.floats(0, 253_402_300_799.0, allow_nan=False)
         | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5))
durations = st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 3)
ints = st.integers(-2**70, 2**70) | st.booleans()

events = st.builds(
    DeliveryEvent,
    kind=st.sampled_from(["leg", "message", "refused", "connection"]),
    session_id=text, message_id=anything, client_ip=text, helo=anything, mail_from=anything,
    recipients=st.lists(text, max_size=3).map(tuple), destination=text, route=anything,
    size=ints, code=ints, reply=text, stage=text, duration=durations, node=anything,
    reason=anything,
    tls=anything | st.just("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits)"),
    time=times,
)
# What sessions hand over: valid UTF-8, the time and durations of a running server, ints.
ordinary = st.builds(
    DeliveryEvent,
    kind=st.sampled_from(["leg", "message", "refused", "connection"]),
    session_id=plain, message_id=plain, client_ip=plain, helo=plain, mail_from=plain,
    recipients=st.lists(plain, max_size=3).map(tuple), destination=plain, route=plain,
    size=st.integers(-2**63, 2**63 - 1), code=st.integers(0, 999), reply=plain, stage=plain,
    duration=st.floats(0, 1e6), node=plain, reason=plain,
    tls=st.just("") | st.from_regex(r"TLSv1\.[23]:[A-Z0-9_]{1,30}", fullmatch=True),
    time=st.floats(0, 4_000_000_000),
)
