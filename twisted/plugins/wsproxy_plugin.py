"""
The twistd entry point: C{twistd wsproxy --config FILE}.

Nothing heavy is imported here; twistd loads L{wsproxy.tap} only when the
plugin is used.
"""

from twisted.application.service import ServiceMaker

wsproxy = ServiceMaker(
    "wsproxy",
    "wsproxy.tap",
    "A WebSocket-aware HTTP/1.1 reverse proxy (TLS, redirect, round-robin pool).",
    "wsproxy",
)
