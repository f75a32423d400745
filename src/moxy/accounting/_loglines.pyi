from collections.abc import Sequence

from moxy.accounting.events import DeliveryEvent

def encode(batch: Sequence[DeliveryEvent], /) -> bytes | None: ...
