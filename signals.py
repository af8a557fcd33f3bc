"""Signals other layers subscribe to (blinker, as Flask's own signals): no imports between them."""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Sent once per forwarded request when its answer ends, however it ends;
#: ``call`` is the finished :class:`pipeline.Call`. Sender: the Flask app.
call_finished = _signals.signal("gate-call-finished")

#: Sent when the gate answers a request itself with an error (``error`` is the
#: GateError or werkzeug HTTPException; ``cls`` the endpoint class or None).
call_rejected = _signals.signal("gate-call-rejected")
