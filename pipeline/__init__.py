"""What the layers of a request share, importing nothing of theirs.

The proxy, the limiter, the work queue and the status page all speak of the
same forwarded request (``Call``) and the same event (the client left:
``ClientDisconnected``). They live here, below every layer, so that the
imports run one way: app → status → limiter, workqueue → proxy → this core.
"""

from __future__ import annotations

from .call import Call, usage_of


class ClientDisconnected(Exception):
    """The client closed its connection before the gate finished answering."""


__all__ = ["Call", "ClientDisconnected", "usage_of"]
