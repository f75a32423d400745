from collections.abc import Sequence

from moxy.accounting.events import DeliveryEvent

def encode_lines(batch: Sequence[DeliveryEvent], /) -> bytes | None: ...
