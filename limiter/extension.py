"""The limiter's Flask wiring: client identity, API keys, per-class limits, token budgets, headers.

A request to a forwarded endpoint goes through, in order:

0. The reject cache (``reject_cache``, limiter.fastpath), WSGI middleware that
   create_app places after ProxyFix and before the proxy's light lane: a client
   already over a limit gets its 429 there, without Flask.
1. ``_identify`` (before_request): who the client is. With GATE_API_KEYS_FILE, the
   key its Bearer secret matches (401 without one, 403 for an admin endpoint with a
   user key); otherwise its address, X-Forwarded-For trusted for
   GATE_TRUSTED_PROXIES hops by ProxyFix. Sets ``g.gate_client`` for every layer.
2. Flask-Limiter's check (before_request): the limits of the endpoint's class, per
   key overrides applied, counted per client and class in a moving window.
3. ``_check_budget`` (before_request): 429 while the client's token budget is spent.
4. ``_add_headers`` (after_request): the limit headers, on answers and rejections.

Token counts arrive through the ``call_finished`` signal when an answer ends.
The gate's own endpoints (/gate/*, /metrics) are in no class and never limited here.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limit, Limiter, RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.storage import Storage, storage_from_string

import error_handlers
from endpoints import ADMIN, CLASSES, EMBED, ENDPOINT_CLASSES, INFERENCE, EndpointClass
from errors import (
    BadRequest,
    Forbidden,
    ModelNotAllowed,
    RateLimited,
    TokenBudgetSpent,
    Unauthorized,
    UpstreamUnavailable,
)
from pipeline import Call, Identity
from proxy.views import read_body
from settings import Settings, SettingsError
from signals import call_finished, call_rejected
from workqueue.core import PRIORITY_HEADER, served_priority

from .allow import LISTINGS, NotAllowed, Unreadable, filter_listing, named_models
from .budget import WINDOW, BudgetState, TokenBudgets
from .fastpath import RejectCache, static_routes
from .guard import AuthGuard
from .headers import TOKENS, Quota, limit_headers, policy_name, retry_after
from .identity import client_address
from .keys import ApiKey, Keyring, load_keys
from .policy import OFF, burst_room

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

logger = logging.getLogger(__name__)

# Answers of these classes cost tokens, so they count against (and wait for) budgets.
TOKEN_CLASSES = frozenset({INFERENCE, EMBED})
# Requests of these classes may wait in the work queue, so they have a priority class.
QUEUED = frozenset({INFERENCE, EMBED, ADMIN})
# X-Gate-Priority as the WSGI environ names it.
_PRIORITY_ENVIRON = "HTTP_" + PRIORITY_HEADER.upper().replace("-", "_")
# An anonymous client presents no key header: nothing for the lane to drop.
_NO_HEADERS: frozenset[str] = frozenset()
# identify_lane's answers kept for anonymous clients at most (then forgotten at once).
_ANONYMOUS_KEPT = 4096
_UNKNOWN: Any = object()
# Seconds a Redis may take to connect or answer before it counts as down and limits
# fall back to this process's memory: a paused Redis never holds a request longer.
STORAGE_TIMEOUT = 0.5
# Storage keys are gate/<client>/<class>/...; two gates on one Redis share them.
KEY_PREFIX = "gate"


class _QuietBreaches(logging.Filter):
    """Drop Flask-Limiter's INFO line per rejected request: a flood would fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ratelimit ")


_QUIET_BREACHES = _QuietBreaches()
# RFC 6750: a 401 says which scheme the gate expects.
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ollama-gate"'}


@functools.lru_cache(maxsize=256)
def _items(limit: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_many(limit))


def storage_options(uri: str) -> dict[str, Any]:
    """redis-py options: short timeouts and no retries, so a dead Redis costs one timeout."""
    if uri.startswith("memory://"):
        return {}
    # Imported here: redis-py costs each gate process about 0.1 s of CPU to import, and
    # limits imports it only for a redis:// storage too.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "socket_timeout": STORAGE_TIMEOUT,
        "socket_connect_timeout": STORAGE_TIMEOUT,
        # redis-py 6+ retries 3 times with backoff by default: seconds per call on a dead server.
        "retry": Retry(NoBackoff(), 0),
    }


class GateLimiter:
    """The limiter extension: ``init_app`` registers its hooks; create_app keeps it in the
    app's Pipeline (its ``identify_lane``, ``keyring`` and ``stats`` serve other layers)."""

    def __init__(self, settings: Settings) -> None:
        self.keys_file = settings.api_keys_file
        self.keyring: Keyring | None = load_keys(self.keys_file) if self.keys_file else None
        self.defaults: dict[EndpointClass, str] = {
            cls: getattr(settings, f"limit_{cls}") for cls in CLASSES
        }
        self.auth_fail_limit = settings.auth_fail_limit
        self.guard: AuthGuard | None = None  # with a keys file: set by init_app
        self.anon_tokens_per_minute = settings.anon_tokens_per_minute
        self.anon_priority = settings.anon_priority
        self.storage_uri = settings.storage_uri
        self.trusted_proxies = settings.trusted_proxies
        self._check_limit_strings()
        if self.keyring is not None:
            self._check_key_limits(self.keyring)
        self._warn_of_burst_refusals(settings)
        # With every class off and no keys file (whose keys may turn a class on, now or
        # after a reload) Flask-Limiter is not installed at all.
        self.enabled = self.keyring is not None or any(v != OFF for v in self.defaults.values())
        self.limiter = Limiter(
            key_func=self._limit_key,
            default_limits=[
                Limit(
                    self._limit_string, key_function=self._limit_key, scope=self._scope, shared=True
                )
            ],
            strategy="moving-window",
            storage_uri=settings.storage_uri,
            storage_options=cast(dict[str, str | int], storage_options(settings.storage_uri)),
            key_prefix=KEY_PREFIX,
            headers_enabled=False,  # written by _add_headers, with the IETF fields too
            in_memory_fallback_enabled=True,
            swallow_errors=True,
            enabled=self.enabled,
        )
        self.budgets = TokenBudgets(None)
        self.rejections: Counter[str] = Counter()  # 429s per class, for the status page
        self.cache: RejectCache | None = None
        # identify_lane's answers without API keys, by (address, class, priority asked for).
        self._anonymous: dict[tuple[Any, ...], Identity | None] = {}

    def _check_limit_strings(self) -> None:
        """Parse every limit string with the limits library itself: fail at boot, not later."""
        strings = {f"GATE_LIMIT_{cls.upper()}": self.defaults[cls] for cls in CLASSES}
        self._check_strings({**strings, "GATE_AUTH_FAIL_LIMIT": self.auth_fail_limit})

    def _check_key_limits(self, keyring: Keyring) -> None:
        strings = {
            f"{self.keys_file} [keys.{key.name}] limit_{cls}": value
            for key in keyring.keys
            for cls, value in key.limits.items()
        }
        self._check_strings(strings)

    @staticmethod
    def _check_strings(strings: dict[str, str]) -> None:
        for where, value in strings.items():
            if value != OFF:
                try:
                    _items(value)
                except ValueError as exc:
                    raise SettingsError(f"{where}={value!r}: {exc}") from None

    def _warn_of_burst_refusals(self, settings: Settings) -> None:
        """Say so when a queued class's limit refuses bursts the client's queue share holds."""
        for cls in (INFERENCE, EMBED):
            rate = burst_room(self.defaults[cls])
            if rate is not None and rate.amount < settings.queue_max_per_client:
                logger.warning(
                    "GATE_LIMIT_%s=%s admits %d requests per %d s, fewer than a client's queue "
                    "share (GATE_QUEUE_MAX_PER_CLIENT=%d): bursts the queue would hold get 429",
                    cls.upper(),
                    self.defaults[cls],
                    rate.amount,
                    rate.seconds,
                    settings.queue_max_per_client,
                )

    def init_app(self, app: Flask) -> None:
        """Register the limiter's hooks on ``app`` (its WSGI part: ``reject_cache``)."""
        app.before_request(self._identify)
        storage: Storage | None = None
        if self.enabled:
            self.limiter.init_app(app)  # its before_request runs after _identify
            storage = self.limiter.storage
            logging.getLogger("flask-limiter").addFilter(_QUIET_BREACHES)
        elif self._any_budget() and not self.storage_uri.startswith("memory://"):
            storage = cast(
                Storage, storage_from_string(self.storage_uri, **storage_options(self.storage_uri))
            )
        if storage is not None and not storage.check():
            logger.warning(
                "rate-limit storage %s does not answer; limits count in memory until it does",
                _redacted(self.storage_uri),
            )
        self.budgets = TokenBudgets(storage)
        if self.keyring is not None and self.auth_fail_limit != OFF:
            self.guard = AuthGuard(self.auth_fail_limit, storage)
            call_rejected.connect(self._count_failed_key, sender=app)
        app.before_request(self._check_budget)
        app.after_request(self._add_headers)
        app.after_request(_filter_listing)
        app.register_error_handler(RateLimitExceeded, self._rate_limited)
        if self.keyring is not None or self.anon_tokens_per_minute:
            # Without either no call ever spends a token budget (the keys file, which
            # reload_keys re-reads, is the only source of per-key budgets).
            call_finished.connect(self._spend_tokens, sender=app)

    def reload_keys(self) -> bool:
        """Re-read the keys file (SIGHUP, limiter.reload); a file that fails keeps the old keys.

        The keyring is changed in place: the reject cache, the light lane and the status
        page hold the same object. Returns whether the new keys are in force.
        """
        if self.keyring is None or self.keys_file is None:
            logger.info("SIGHUP: no GATE_API_KEYS_FILE, no keys to re-read")
            return False
        try:
            fresh = load_keys(self.keys_file)
            self._check_key_limits(fresh)
        except ValueError as exc:  # KeysFileError, SettingsError: both name file and line
            logger.error("keys file not reloaded, the keys in force stay: %s", exc)
            return False
        old = set(self.keyring.by_name)
        self.keyring.replace(fresh)
        new = set(fresh.by_name)
        logger.info(
            "keys file %s reloaded: %d keys (added: %s; removed: %s)",
            self.keys_file,
            len(fresh),
            ", ".join(sorted(new - old)) or "none",
            ", ".join(sorted(old - new)) or "none",
        )
        return True

    @property
    def rejects_early(self) -> bool:
        """Whether anything is limited, so that the reject cache has clients to answer."""
        return self.enabled or self._any_budget()

    def reject_cache(self, wsgi_app: WSGIApplication) -> RejectCache:
        """The WSGI middleware that answers clients already over a limit (limiter.fastpath),
        in front of ``wsgi_app``; create_app places it."""
        self.cache = RejectCache(wsgi_app, self.keyring, self.rejections, self.guard)
        return self.cache

    # -- who the client is -------------------------------------------------------------

    def _identify(self) -> None:
        """Set g.gate_client; on forwarded endpoints, demand a valid key when keys are on."""
        if self.cache is not None and not self.cache.routes:
            # Built on the first request, once every blueprint's routes are registered.
            self.cache.routes = static_routes(current_app.url_map.iter_rules(), ENDPOINT_CLASSES)
        # Flask's proxies, looked up once: every use of request or g costs a lookup.
        req = request._get_current_object()  # type: ignore[attr-defined]
        ctx = g._get_current_object()
        cls = ENDPOINT_CLASSES.get(req.endpoint or "")
        key: ApiKey | None = None
        if self.keyring is not None:
            header, key = self.keyring.presented(req.environ)
            if header is not None and key is not None:
                # The secret is the gate's, not Ollama's: proxy.forward_headers drops it.
                ctx.gate_consumed_headers = frozenset({header})
            if cls is not None and req.method != "OPTIONS":
                if header is None:
                    raise Unauthorized(
                        "missing API key: send Authorization: Bearer <key>", headers=_CHALLENGE
                    )
                if key is None:
                    logger.info("unknown API key from %s on %s", req.remote_addr, req.path)
                    raise Unauthorized("invalid API key", headers=_CHALLENGE)
                if cls == ADMIN and not key.is_admin:
                    raise Forbidden(
                        f"API key {key.name!r} has role user; {req.path} needs role admin"
                    )
                if key.models is not None:
                    _check_models(key)
        if key is not None:
            ctx.gate_key = key
            ctx.gate_client = key.name
            ctx.gate_limit_key = f"key:{key.name}"
        else:
            client = ctx.gate_client = client_address(req.remote_addr)
            ctx.gate_limit_key = f"ip:{client}"
        if cls is not None:
            ctx.gate_class = cls
            if cls in QUEUED and req.method != "OPTIONS":
                ctx.gate_priority = self._priority(key, req.headers.get(PRIORITY_HEADER))

    def _priority(self, key: ApiKey | None, asked: str | None) -> str:
        """The class a queued request is served at: its key's ceiling (anonymous clients:
        GATE_ANON_PRIORITY), or the lower one its X-Gate-Priority ``asked`` for (400 for a
        name that is no class)."""
        try:
            return served_priority(self._ceiling(key), asked)
        except ValueError as exc:
            raise BadRequest(f"{PRIORITY_HEADER}: {exc}") from None

    def identify_lane(self, environ: Mapping[str, Any], cls: EndpointClass) -> Identity | None:
        """Who sends a request of class ``cls`` that no limit applies to, for the light lane.

        Its Identity (client, names of the headers that carried its API key, the
        class its job is served at), as ``_identify`` would find them; None when the
        limiter has a say in the request, which must then go through Flask: a key to
        reject, a limit of its class to count, a token budget, a model allow-list (its
        models are checked, its listings filtered), an X-Gate-Priority to refuse.
        """
        if self.keyring is None:
            # Without keys the answer follows from the address, the class and the priority
            # asked for alone (the settings do not change): found once for each.
            asked = (environ.get("REMOTE_ADDR"), cls, environ.get(_PRIORITY_ENVIRON))
            known = self._anonymous.get(asked, _UNKNOWN)
            if known is _UNKNOWN:
                if len(self._anonymous) >= _ANONYMOUS_KEPT:
                    self._anonymous.clear()  # addresses come from clients: bounded
                known = self._anonymous[asked] = self._identify_anonymous(*asked)
            return cast(Identity | None, known)
        header, key = self.keyring.presented(environ)
        if header is None or key is None or self.limit_for(cls, key) != OFF:
            return None
        if key.models is not None or (cls == ADMIN and not key.is_admin):
            return None
        client, consumed = key.name, frozenset({header})
        if cls not in QUEUED:
            return Identity(client, consumed)
        if cls in TOKEN_CLASSES and self.budget_for(key) is not None:
            return None
        try:
            priority = served_priority(self._ceiling(key), environ.get(_PRIORITY_ENVIRON))
        except ValueError:
            return None  # Flask answers the 400
        return Identity(client, consumed, priority)

    def _identify_anonymous(
        self, address: str | None, cls: EndpointClass, asked: str | None
    ) -> Identity | None:
        """identify_lane for a request without API keys: from ``address``, ``cls`` and the
        X-Gate-Priority ``asked`` for."""
        if self.defaults[cls] != OFF:
            return None
        client = client_address(address)
        if cls not in QUEUED:
            return Identity(client, _NO_HEADERS)
        if cls in TOKEN_CLASSES and self.budget_for(None) is not None:
            return None
        try:
            priority = served_priority(self._ceiling(None), asked)
        except ValueError:
            return None  # Flask answers the 400
        return Identity(client, _NO_HEADERS, priority)

    def _ceiling(self, key: ApiKey | None) -> str:
        """The highest class ``key``'s jobs are served at (anonymous: GATE_ANON_PRIORITY)."""
        return key.priority if key is not None else self.anon_priority

    def _limit_key(self) -> str:
        return cast(str, g.gate_limit_key)

    def _scope(self, endpoint: str) -> str:
        # Shared per class: /api/generate and /v1/chat/completions draw on one bucket.
        return cast(str, g.gate_class)

    def _count_failed_key(self, sender: Flask, error: Any, **_: Any) -> None:
        """A 401 to a request that presented a key (here or on the status page) is a failure."""
        if self.guard is None or not isinstance(error, Unauthorized):
            return
        environ = request.environ
        if environ.get("HTTP_AUTHORIZATION") or environ.get("HTTP_X_API_KEY"):
            self.guard.failed(client_address(request.remote_addr))

    def caps_of(self, client: str) -> tuple[int | None, int | None]:
        """The work-queue caps of ``client`` (a key name): its key's max_waiting, max_running."""
        key = self.keyring.by_name.get(client) if self.keyring is not None else None
        return (key.max_waiting, key.max_running) if key is not None else (None, None)

    def limit_for(self, cls: EndpointClass, key: ApiKey | None) -> str:
        """The limit string for ``cls`` and ``key`` (its override, else the class default)."""
        if key is not None and cls in key.limits:
            return key.limits[cls]
        return self.defaults[cls]

    def _limit_string(self) -> str:
        cls: EndpointClass | None = g.get("gate_class")
        if cls is None or request.method == "OPTIONS":
            return ""
        value = self.limit_for(cls, g.get("gate_key"))
        return "" if value == OFF else value

    # -- token budgets -------------------------------------------------------------------

    def budget_for(self, key: ApiKey | None) -> int | None:
        """Tokens per minute a client may spend: its key's budget, or the anonymous one."""
        if self.keyring is not None:
            return key.tokens_per_minute if key is not None else None
        return self.anon_tokens_per_minute or None

    def _any_budget(self) -> bool:
        if self.keyring is not None:
            return any(key.tokens_per_minute for key in self.keyring.keys)
        return bool(self.anon_tokens_per_minute)

    def _budget_state(self) -> BudgetState | None:
        ctx = g._get_current_object()
        if ctx.get("gate_class") not in TOKEN_CLASSES or request.method == "OPTIONS":
            return None
        budget = self.budget_for(ctx.get("gate_key"))
        if budget is None:
            return None
        return self.budgets.state(ctx.gate_limit_key, budget)

    def _check_budget(self) -> None:
        state = self._budget_state()
        if state is None:
            return
        g.gate_budget = state
        if state.spent:
            raise self._reject(
                f"token budget spent: {state.limit} tokens per minute", TokenBudgetSpent
            )

    def _spend_tokens(self, sender: Flask, call: Call, **_: Any) -> None:
        self.spend(call)  # call_finished, sent when an answer ends

    def spend(self, call: Call) -> None:
        """Count a finished call's tokens against its client's budget."""
        if call.cls not in TOKEN_CLASSES or call.tokens <= 0:
            return
        if self.keyring is not None:
            key = self.keyring.by_name.get(call.client)
            if key is None or not key.tokens_per_minute:
                return
            self.budgets.spend(f"key:{key.name}", call.tokens)
        elif self.anon_tokens_per_minute:
            self.budgets.spend(f"ip:{call.client}", call.tokens)

    # -- responses ----------------------------------------------------------------------

    def quotas(self) -> list[Quota]:
        """Every limit on the current request, as it stands after this request."""
        cls: EndpointClass | None = g.get("gate_class")
        if cls is None:
            return []
        quotas: list[Quota] = []
        names: list[str] = []
        if self.enabled:
            evaluated = self.limiter.current_limits
            limit = self._limit_string()
            if evaluated and limit:
                # After a breach Flask-Limiter stops evaluating; read the rest of the class's
                # limits under the same storage key arguments.
                args = evaluated[0].request_args
                seen = {(rl.limit.amount, rl.limit.get_expiry()): rl for rl in evaluated}
                for item in _items(limit):
                    rl = seen.get((item.amount, item.get_expiry()))
                    stats = (
                        rl.window
                        if rl is not None
                        else self.limiter.limiter.get_window_stats(item, *args)
                    )
                    name = policy_name(cls, item.get_expiry(), names)
                    names.append(name)
                    quotas.append(Quota(name, item.amount, item.get_expiry(), stats[1], stats[0]))
        state = g.get("gate_budget") or self._budget_state()
        if state is not None:
            quotas.append(
                Quota(
                    policy_name("tokens", WINDOW, names),
                    state.limit,
                    WINDOW,
                    state.remaining,
                    state.reset,
                    TOKENS,
                )
            )
        return quotas

    def _reject(self, message: str, error: type[RateLimited] = RateLimited) -> RateLimited:
        """The 429 for the current request; its client's class stays blocked until it frees."""
        cls: EndpointClass = g.gate_class
        g.gate_rate_limited = True
        quotas = g.gate_quotas = self.quotas()
        now = time.time()
        wait = retry_after(quotas, now) if quotas else 1
        self.rejections[cls] += 1
        exhausted = [q.reset for q in quotas if q.exhausted]
        if self.cache is not None and exhausted:
            self.cache.block(g.gate_limit_key, cls, max(exhausted), message, quotas, error)
        return error(f"{message}; retry in {wait}s")

    def _rate_limited(self, exc: RateLimitExceeded) -> Response:
        """Flask-Limiter's 429 in the contract's shape (Ollama's JSON, OpenAI's under /v1)."""
        cls = g.get("gate_class") or "these"
        return error_handlers.render(
            self._reject(f"rate limit exceeded: {exc.limit.limit} for {cls} requests")
        )

    def stats(self) -> dict[str, Any]:
        """What the status page shows of the limiter: rejections per class, storage health."""
        return {
            "rejected": {cls: self.rejections[cls] for cls in CLASSES},
            "storage": _redacted(self.storage_uri),
            "storage_fallback": (self.enabled and counting_in_memory(self.limiter))
            or self.budgets.falling_back
            or (self.guard is not None and self.guard.storage.falling_back),
            "auth_guard": self.guard.stats() if self.guard is not None else None,
        }

    def _add_headers(self, response: Response) -> Response:
        ctx = g._get_current_object()
        cls = ctx.get("gate_class")
        if cls is None:
            return response
        quotas = ctx.get("gate_quotas")
        if quotas is None:
            if not self.enabled and (
                cls not in TOKEN_CLASSES or self.budget_for(ctx.get("gate_key")) is None
            ):
                return response  # no limit and no token budget: no headers to add
            try:
                quotas = self.quotas()
            except Exception as exc:  # the storage died since the check: answer without them
                logger.warning("limit headers left out: rate-limit storage failed: %s", exc)
                return response
        headers = limit_headers(quotas, time.time(), rejected=ctx.get("gate_rate_limited", False))
        for name, value in headers.items():
            response.headers[name] = value
        return response


def _check_models(key: ApiKey) -> None:
    """403 when the request names a model outside ``key``'s allow-list, wherever it names it.

    The path's model (/v1/models/:model) and every model field of a JSON body; a
    body the gate cannot read as Ollama would is refused (400), never forwarded.
    """
    assert key.models is not None
    names = []
    path_model = (request.view_args or {}).get("model")
    if isinstance(path_model, str):
        names.append(path_model)
    if not (request.url_rule and request.url_rule.rule.startswith("/api/blobs/")):
        try:
            names.extend(named_models(read_body()))
        except Unreadable as exc:
            raise BadRequest(str(exc)) from None
    try:
        key.models.check(names)
    except NotAllowed as exc:
        raise ModelNotAllowed(
            f"model {exc.name!r} is not allowed for API key {key.name!r}"
        ) from None


def listing_path(path: str) -> str | None:
    """The model listing (LISTINGS) that ``path`` reaches at Ollama, if any, however spelt."""
    clean = posixpath.normpath(re.sub("/+", "/", path)) if path else path
    return clean if clean in LISTINGS else None


def _filter_listing(response: Response) -> Response:
    """A key with an allow-list sees only its own models in /api/tags, /api/ps, /v1/models."""
    key: ApiKey | None = g.get("gate_key")
    if key is None or key.models is None or request.method != "GET":
        return response
    path = listing_path(request.path)
    if path is None or not 200 <= response.status_code < 300:
        return response
    try:
        body = b"".join(response.iter_encoded())
        if response.headers.get("Content-Encoding", "identity") != "identity":
            raise Unreadable(f"upstream's {path} answer is encoded")
        body = filter_listing(path, body, key.models)
    except Exception as exc:  # anything but a listing the gate can filter: show nothing
        logger.warning("%s for API key %r not filtered, refused: %s", path, key.name, exc)
        return error_handlers.render(
            UpstreamUnavailable(f"cannot read the upstream's {path} answer")
        )
    finally:
        response.close()
    response.set_data(body)
    response.headers["Content-Length"] = str(len(body))
    return response


def counting_in_memory(limiter: Limiter) -> bool:
    """Whether Flask-Limiter counts in its in-memory fallback because its storage failed.

    It has no flag for that in its public API, but its public ``limiter`` property
    hands out the fallback strategy, on a storage of its own, while the configured
    ``storage`` is down. tests/test_limiter_units.py holds this reading to the
    library's behaviour with a storage that refuses connections.
    """
    return limiter.limiter.storage is not limiter.storage


def _redacted(uri: str) -> str:
    """A storage URI without its password, for logs."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"
