"""Stored responses (`store: true`, the Responses API's default): what `GET /v1/responses/{id}`
returns and what `previous_response_id` continues from.

In memory and bounded: past ``capacity`` responses the least recently used one is dropped (a
later reference to it is a 404, as to one never stored), so a long-running server's memory does
not grow with its traffic. A restart forgets them all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CAPACITY = 1000


@dataclass(frozen=True)
class StoredResponse:
    # The response object as the client got it.
    body: dict[str, Any]
    # The conversation it answered, as chat messages (without its instructions, which do not carry
    # over), and its answer as the messages that continue it.
    messages: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None
