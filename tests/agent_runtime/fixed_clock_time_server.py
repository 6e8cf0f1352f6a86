"""The real mcp-server-time with its clock frozen, so agent tests that read the time back see the same answer.

`python fixed_clock_time_server.py [server args...]`: every `datetime.now()` inside the server returns FIXED_INSTANT
in the asked timezone; the rest of the server is the installed package.
"""

from __future__ import annotations

from datetime import datetime, tzinfo

import mcp_server_time
from mcp_server_time import server

# A time of day whose hours and minutes cannot be confused with each other or with the seconds.
FIXED_INSTANT = "2026-03-14T05:26:53+00:00"


def frozen_datetime(instant: datetime) -> type[datetime]:
    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]  # datetime.now is typed to return Self; this one returns the fixed instant, a plain datetime
            return instant.astimezone(tz) if tz is not None else instant.astimezone().replace(tzinfo=None)

    return FrozenDatetime


def main() -> None:
    server.datetime = frozen_datetime(datetime.fromisoformat(FIXED_INSTANT))
    mcp_server_time.main()  # parses the server's own arguments from sys.argv


if __name__ == "__main__":
    main()
