from moxy.logsetup import plural


def test_plural_says_one_thing_in_the_singular() -> None:
    assert plural(1, "event") == "1 event"
    assert plural(1, "malformed line") == "1 malformed line"


def test_plural_says_none_and_many_in_the_plural() -> None:
    assert plural(0, "counter") == "0 counters"
    assert plural(2, "event") == "2 events"
    assert plural(10_000, "event") == "10000 events"
