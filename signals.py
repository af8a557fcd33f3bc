"""Signals other layers subscribe to (blinker, as Flask's own signals): no imports between them."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

from blinker import ANY, NamedSignal, Namespace
from blinker._utilities import make_id
from blinker.base import ANY_ID as _ANY_ID  # the id blinker files receivers for ANY under


class CallSignal(NamedSignal):
    """The blinker signal sent once per forwarded request, whose receivers are found once.

    ``send_call(sender, call)`` sends it as ``send(sender, call=call)`` does, to
    receivers that are plain functions; which receivers those are for a sender is
    worked out (as ``receivers_for`` does) once per change of the signal's
    connections, not on every send.
    """

    def __init__(self, name: str, doc: str | None = None) -> None:
        super().__init__(name, doc)
        # id(sender) -> the ids of its receivers, in the order receivers_for gives them
        self._found: dict[int, tuple[Hashable, ...]] = {}

    def send_call(self, sender: Any, call: Any) -> None:
        """``send(sender, call=call)``, less its check of each receiver for a coroutine
        function, its list of their answers and its look-up of the receivers (a few µs)."""
        if self.is_muted or not self.receivers:
            return
        ids = self._found.get(id(sender))
        if ids is None:
            ids = self._receiver_ids(sender)
        receivers = self.receivers
        for receiver_id in ids:  # as receivers_for goes through its ids
            receiver = receivers.get(receiver_id)
            if receiver is None:
                continue
            if isinstance(receiver, weakref.ref):
                strong = receiver()
                if strong is None:
                    self._disconnect(receiver_id, _ANY_ID)
                    continue
                receiver = strong
            receiver(sender, call=call)

    def _receiver_ids(self, sender: Any) -> tuple[Hashable, ...]:
        sender_id = make_id(sender)
        by_sender = self._by_sender
        if sender_id in by_sender:
            ids = tuple(by_sender[_ANY_ID] | by_sender[sender_id])
        else:
            ids = tuple(by_sender[_ANY_ID])
        if sender_id == id(sender):
            # Not for senders blinker knows by value or by method (make_id): another such
            # sender may come with the same id(). A sender that dies and whose id() is
            # reused is blinker's case too: it forgets a weakly referenced one (see
            # _make_cleanup_sender), and keeps its receivers for any other.
            self._found[sender_id] = ids
        return ids

    # Every change of who receives what for a sender goes through these.

    def connect(self, receiver: Any, sender: Any = ANY, weak: bool = True) -> Any:
        self._found.clear()
        try:
            return super().connect(receiver, sender, weak)
        finally:
            self._found.clear()

    def _disconnect(self, receiver_id: Hashable, sender_id: Hashable) -> None:
        self._found.clear()
        super()._disconnect(receiver_id, sender_id)

    def _make_cleanup_sender(self, sender_id: Hashable) -> Callable[[weakref.ref[Any]], None]:
        cleanup = super()._make_cleanup_sender(sender_id)

        def forget(ref: weakref.ref[Any]) -> None:
            self._found.clear()
            cleanup(ref)

        return forget

    def _clear_state(self) -> None:
        self._found.clear()
        super()._clear_state()


_signals = Namespace()

#: Sent once per forwarded request when its answer ends, however it ends;
#: ``call`` is the finished :class:`pipeline.Call`. Sender: the Flask app.
call_finished = CallSignal("gate-call-finished")
_signals[call_finished.name] = call_finished

#: Sent when the gate answers a request itself with an error (``error`` is the
#: GateError or werkzeug HTTPException; ``cls`` the endpoint class or None).
call_rejected = _signals.signal("gate-call-rejected")
