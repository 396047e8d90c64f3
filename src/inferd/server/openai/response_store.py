"""Stored responses (`store: true`, the Responses API's default): what `GET /v1/responses/{id}`
returns and what `previous_response_id` continues from.

In memory and bounded twice: past ``max_responses`` responses, or ``max_bytes`` of them, the least
recently used are dropped (a later reference to one is a 404, as to one never stored), so a
long-running server's memory does not grow with its traffic. Each is kept as its JSON text, which
is also what its size is counted by. A restart forgets them all; replicas do not share them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_RESPONSES = 1000
DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class StoredResponse:
    # The response object as the client got it, as JSON.
    body_json: bytes
    # The conversation it answered, as chat messages (without its instructions, which do not carry
    # over), then its answer as the messages that continue it; as JSON.
    messages_json: bytes
    # The conversation it answered as the API's items, each with its id (its input items); as JSON.
    items_json: bytes

    @classmethod
    def of(
        cls, body: dict[str, Any], messages: list[dict[str, Any]], items: list[dict[str, Any]]
    ) -> StoredResponse:
        return cls(json.dumps(body).encode(), json.dumps(messages).encode(), json.dumps(items).encode())

    @property
    def size(self) -> int:
        return len(self.body_json) + len(self.messages_json) + len(self.items_json)

    @property
    def input_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(self.items_json)
        return items

    @property
    def output(self) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = json.loads(self.body_json)["output"]
        return output

    @property
    def status(self) -> str:
        status: str = json.loads(self.body_json)["status"]
        return status

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = json.loads(self.messages_json)
        return messages


class ResponseStore:
    def __init__(
        self, max_responses: int = DEFAULT_MAX_RESPONSES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.bytes = 0
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        """Keep ``stored``; one larger than the whole budget is not kept at all."""
        self.delete(response_id)
        if stored.size > self.max_bytes:
            return
        self._responses[response_id] = stored
        self.bytes += stored.size
        while len(self._responses) > self.max_responses or self.bytes > self.max_bytes:
            _, dropped = self._responses.popitem(last=False)
            self.bytes -= dropped.size

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self.bytes -= stored.size
        return True
