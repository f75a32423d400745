from collections.abc import Iterable, Sequence
from typing import Any

from moxy.accounting.events import DeliveryEvent

def expand(
    emitted: Iterable[tuple[Any, ...]], cls: type[DeliveryEvent], marker: str, /
) -> list[DeliveryEvent] | None: ...
def sum_known(batch: Sequence[DeliveryEvent], sums: dict[Any, list[Any]], start: int, /) -> int: ...
