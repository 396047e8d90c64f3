"""How much a client may send before its request is known, and how slowly (nginx's
`large_client_header_buffers`, `client_header_timeout` and `client_body_timeout`).

Without them one client holds memory or a connection for as long as it likes: the HTTP parser
buffers a header line of any length (a single 200 MiB header grew the server by 250 MiB), and a
client that sends a byte now and then, in its headers or its body, is never timed out.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from inferd.entrypoints.engine_args import non_negative_float, positive_int

DEFAULT_MAX_HEADER_BYTES = 2**20
DEFAULT_HEADER_TIMEOUT_S = 60.0
DEFAULT_BODY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClientLimits:
    # A request line and headers over this many bytes are refused with a 431.
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    # Seconds from a connection's opening, or a request's first byte, to the end of its headers;
    # past them a 408 and the connection is closed. 0: no limit.
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    # Seconds a request's body may go without a byte arriving (not the whole body's time, so a large
    # upload on a slow link still gets through); past them a 408. 0: no limit.
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    @property
    def header_deadline_s(self) -> float | None:
        return _limit_or_none(self.header_timeout_s)

    @property
    def body_deadline_s(self) -> float | None:
        return _limit_or_none(self.body_timeout_s)


def _limit_or_none(seconds: float) -> float | None:
    """None for 0 (the flags' "no limit") and for infinity, which a timer cannot be set to."""
    return seconds if 0 < seconds < math.inf else None


def add_client_limit_args(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--max-header-bytes",
        type=positive_int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help="refuse a request whose request line and headers are larger with a 431, counted as they "
        f"arrive (default {DEFAULT_MAX_HEADER_BYTES})",
    )
    parser.add_argument(
        "--header-timeout",
        type=non_negative_float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds a client gets to send a request's headers, from the connection's opening or the "
        f"request's first byte; then a 408 and the connection closes (default {DEFAULT_HEADER_TIMEOUT_S:g}; "
        "0: no limit)",
    )
    parser.add_argument(
        "--body-timeout",
        type=non_negative_float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a request body may go without a byte arriving; then a 408 in the API's error "
        f"format and the connection closes (default {DEFAULT_BODY_TIMEOUT_S:g}; 0: no limit)",
    )


def client_limits_from_args(args: argparse.Namespace) -> ClientLimits:
    return ClientLimits(
        max_header_bytes=args.max_header_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )
