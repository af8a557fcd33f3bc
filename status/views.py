"""The gate's own endpoints: /gate/status, /gate/status.json, /gate/healthz and /metrics.

They are answered here and never forwarded to Ollama: Flask prefers these
static rules to the proxy's ``/<path:path>`` catch-all, and the rules below
that answer 405 and 404 keep other methods and other /gate/ paths from
falling through to it.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, redirect, render_template, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from pipeline import pipeline_of

from . import access
from .extension import Status, status_of
from .metrics import CONTENT_TYPE

bp = Blueprint(
    "status",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/gate/static",
)

READ = ["GET", "HEAD"]
OTHER = ["POST", "PUT", "PATCH", "DELETE"]
PATHS = ("/gate/status", "/gate/status.json", "/gate/healthz", "/metrics")
NO_STORE = {"Cache-Control": "no-store"}
# Requests that mean someone is watching: they keep the upstream poller running.
WATCHED = frozenset({"status.page", "status.status_json", "status.healthz", "status.metrics"})


def _ext() -> Status:
    ext = status_of(current_app)
    assert ext is not None, "status.init_app's Status is not in the app's Pipeline"
    return ext


@bp.before_request
def guard() -> None:
    """GATE_STATUS_ACCESS for everything this blueprint serves (see access.check)."""
    ext = _ext()
    access.check(
        ext.settings.status_access,
        request.remote_addr,
        request.headers,
        pipeline_of(current_app).keys,
        trusted_proxies=ext.settings.trusted_proxies,
        loopback_ok=request.endpoint == "status.healthz",
    )
    if request.endpoint in WATCHED:
        ext.watched()


def _json(doc: Any, status: int = 200) -> Response:
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return Response(body, status=status, mimetype="application/json", headers=NO_STORE)


@bp.get("/gate/status")
def page() -> Response:
    """The live status page; its script polls status.json once a second."""
    ext = _ext()
    html = render_template("status.html", workers=ext.settings.workers)
    return Response(html, mimetype="text/html", headers=NO_STORE)


@bp.get("/gate/status.json")
def status_json() -> Response:
    """The page's data (docs/STATUS.md); ``?history=0`` leaves out the 15-minute history."""
    history = request.args.get("history", "1").lower() not in ("0", "false", "no")
    return _json(_ext().document(history=history))


@bp.get("/gate/healthz")
def healthz() -> Response:
    """200 when a request forwarded the proxy's way got an answer within the last second
    (or now), else 503: upstream down, or no free connection to it. With several
    backends: 200 while any backend's pollers find it up (fleet/runtime.py)."""
    ext = _ext()
    snapshot = ext.snapshot()
    backends = snapshot.get("backends") if snapshot is not None else None
    if backends:
        return _fleet_health(backends)
    probe = ext.probe
    healthy = probe.check()
    doc: dict[str, Any] = {"status": "ok" if healthy else "unavailable"}
    if not healthy:
        doc["error"] = f"cannot forward: {probe.error or 'unknown'}"
    doc["upstream"] = {"checked_ago": probe.state()["age"], "latency": probe.latency}
    connections = probe.connections()
    if connections is not None:
        doc["upstream"]["connections"] = connections
    return _json(doc, 200 if healthy else 503)


def _fleet_health(backends: list[dict[str, Any]]) -> Response:
    """healthz over several backends: the gate can forward while one of them is up."""
    up = [row["name"] for row in backends if row.get("health") == "up"]
    doc: dict[str, Any] = {
        "status": "ok" if up else "unavailable",
        "backends": {
            row["name"]: {"health": row.get("health"), "checked_ago": row.get("probe_age")}
            for row in backends
        },
    }
    if not up:
        doc["error"] = "cannot forward: no backend is up"
    return _json(doc, 200 if up else 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, this worker's registry only."""
    ext = _ext()
    ext.reconcile(pipeline_of(current_app).limiter)
    body = ext.metrics.exposition(ext.snapshot(), ext.probe.state())
    return Response(body, headers={**NO_STORE, "Content-Type": CONTENT_TYPE})


@bp.route("/gate", methods=READ)
@bp.route("/gate/", methods=READ)
def index() -> Response:
    return redirect("/gate/status")  # type: ignore[return-value]


def not_allowed(**_: Any) -> Response:
    raise MethodNotAllowed(valid_methods=READ)


def not_found(**_: Any) -> Response:
    raise NotFound("no such gate endpoint; see /gate/status")


for _number, _path in enumerate(PATHS):
    bp.add_url_rule(_path, endpoint=f"not_allowed_{_number}", view_func=not_allowed, methods=OTHER)
bp.add_url_rule(
    "/gate/<path:rest>",
    endpoint="unknown",
    view_func=not_found,
    methods=[*READ, *OTHER, "OPTIONS"],
)
