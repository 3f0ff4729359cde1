# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""Glance v2 through python-glanceclient: image records, verified downloads, properties.

Inside nova-compute the Nova integration uses Nova's own Glance client; this wrapper serves
the command line tools, the origin seeder and the fallback of the library's own fetch.
Every failure leaves it typed and naming the image; transient ones are retried first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import http
import http.client
import itertools
import json
import re
import threading
import time
import types
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

import requests
import tenacity
import urllib3
from glanceclient import exc as glance_exc
from glanceclient.common import http as glance_http
from glanceclient.v2 import client as glance_v2
from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.image import ImageInfo, parse_image

LOG = logging.getLogger(__name__)

T = TypeVar("T")

NOAUTH_HEADERS = {
    "X-Roles": "admin,member",
    "X-Project-Id": "nova-torrent-images",
    "X-Tenant-Id": "nova-torrent-images",
    "X-User-Id": "nova-torrent-images",
}

# The operations, as they read in "Glance could not <operation> image <id>".
SHOW = "show"
DOWNLOAD = "download"
UPLOAD = "upload data to"
UPDATE = "update the properties of"
REMOVE = "remove properties from"

# For a GlanceClient built without a ConfigOpts: the options' own defaults.
_DEFAULTS = {opt.name: opt.default for opt in nti_conf.glance.glance_opts}
MAX_RETRY_DELAY = 60.0
RESUME_CHUNK = units.Mi  # bytes per read of a resumed body


class _BadResponse(Exception):
    """Glance answered, but not with image data we can use; never retried."""


# Everything a Glance call or the iteration of a body raises for a failure of Glance, the
# network or the auth service; all of it leaves this module as a typed error. OSError is
# the socket (reads from the body); writes to the destination happen outside these calls.
_GLANCE_ERRORS = (
    glance_exc.BaseException,  # CommunicationError, InvalidEndpoint (a timeout), SSL...
    glance_exc.ClientException,  # HTTPException: every HTTP status, 404 included
    ks_exc.ClientException,
    requests.exceptions.RequestException,  # mid-body: ChunkedEncodingError, ConnectionError
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError
    http.client.HTTPException,  # IncompleteRead
    OSError,
    _BadResponse,
)
# Failures of the transport: connection refused or reset, a body cut short, a timeout.
_TRANSPORT_ERRORS = (
    glance_exc.CommunicationError,
    glance_exc.InvalidEndpoint,
    ks_exc.ConnectionError,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
_TIMEOUTS = (
    requests.exceptions.Timeout,
    urllib3.exceptions.TimeoutError,
    ks_exc.ConnectTimeout,
    TimeoutError,  # socket.timeout
)
_TLS_ERRORS = (
    requests.exceptions.SSLError,
    ks_exc.SSLError,
    glance_exc.SSLCertificateError,
    glance_exc.SSLConfigurationError,
)

# glanceclient turns an HTTP error into an exception class per status, but has none for
# 408, 429 or 504: those become a bare HTTPException whose status is lost. A response hook
# on the client's requests.Session remembers the status of this thread's last response,
# read only to classify such an exception (threading.local is per greenthread under
# eventlet, as in nova-compute).
_last_response = threading.local()


def _remember_status(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    _last_response.status = response.status_code
    # An error answer is kept (not read here) for _error_bodies_read, should glanceclient
    # fail to read its body.
    _last_response.error = response if response.status_code >= 400 else None


def _forget_last_response() -> None:
    """Before each attempt: what this thread received before is no answer to it."""
    _last_response.status = None
    _last_response.error = None


def _watch_statuses(client: Any) -> None:
    session = getattr(getattr(client, "http_client", None), "session", None)
    # glanceclient's HTTPClient holds a requests.Session; its SessionClient (keystoneauth)
    # holds a keystoneauth Session, which holds the requests.Session.
    session = getattr(session, "session", session)
    if isinstance(session, requests.Session):
        hooks = session.hooks.setdefault("response", [])
        if _remember_status not in hooks:
            hooks.append(_remember_status)


@dataclasses.dataclass(frozen=True)
class _Failure:
    """What an operator needs to know about one failed Glance call."""

    transient: bool
    status: int | None
    detail: str
    option: str  # the [torrent_images] setting to look at


def _in_chain(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types) or any(isinstance(a, types) for a in current.args):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _is_timeout(exc: BaseException) -> bool:
    # urllib3's NewConnectionError (connection refused) derives from ConnectTimeoutError
    # for backward compatibility; it is no timeout.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        for e in (current, *current.args):
            if isinstance(e, _TIMEOUTS) and not isinstance(
                e, urllib3.exceptions.NewConnectionError
            ):
                return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, glance_exc.HTTPException):
        if isinstance(exc.code, int):
            return exc.code
        return getattr(_last_response, "status", None)
    if isinstance(exc, ks_exc.HttpError):
        return exc.http_status
    return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- error bodies ------------------------------------------------------------------------
# glanceclient (exc.from_response) reads a JSON error body as a dict of dicts, and any
# other body only with a Content-Type and as valid UTF-8. A 500 from Glance or from a
# proxy in front of it with {"error": "injected"}, [1, 2], "x", a number, no Content-Type
# or bytes that are not UTF-8 then raised AttributeError, KeyError, TypeError or
# UnicodeDecodeError, and HTML under a JSON Content-Type a JSON error: untyped, or typed
# as a permanent failure, so a boot of a cached image failed instead of going offline.
# Such an answer is read again here, defensively, into the HTTP error it was.
ERROR_BODY_LIMIT = 16 * 1024  # bytes of an error body looked at; the detail is shorter
_MAX_MESSAGES = 5


def _json_messages(value: Any, depth: int = 0) -> Iterator[str]:
    """The ``message`` strings anywhere in a JSON error body (Glance and webob's shapes:
    ``{"badRequest": {"message": ...}}``, ``{"message": ..., "code": ...}``)."""
    if depth > 8:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "message" and isinstance(item, (str, int, float)):
                yield str(item)
            else:
                yield from _json_messages(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _json_messages(item, depth + 1)


def error_detail(content_type: str | None, body: bytes | None) -> str:
    """A short, printable detail of an HTTP error body of any shape (never raises).

    JSON (any shape: object, list, string, number, nested) gives its ``message`` strings,
    or else its compact text; HTML its text without tags; anything else its text, bytes
    that are not UTF-8 replaced. An empty body gives ``""``.
    """
    if not body:
        return ""
    text = body[:ERROR_BODY_LIMIT].decode("utf-8", "replace")
    kind = (content_type or "").lower()
    if "json" in kind:
        try:
            parsed = json.loads(text)
            messages = list(itertools.islice(_json_messages(parsed), _MAX_MESSAGES))
            if messages:
                return _short("; ".join(messages))
            return _short(json.dumps(parsed, ensure_ascii=False))
        except (ValueError, RecursionError):
            pass  # a proxy's page under a JSON Content-Type, or nested too deep: as text
    if "html" in kind or text.lstrip().startswith("<"):
        text = html.unescape(re.sub(r"<[^>]*>", " ", text))
    return _short(text)


def _error_body(response: requests.Response) -> bytes:
    # glanceclient has read the whole error body (resp.content) before failing on it.
    try:
        return response.content or b""
    except (RuntimeError, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        LOG.debug("Cannot read Glance's HTTP %d error body: %s", response.status_code, exc)
        return b""


def _http_error(response: requests.Response) -> glance_exc.HTTPException:
    """glanceclient's own error for ``response``'s status, its body read defensively."""
    status = response.status_code
    detail = error_detail(response.headers.get("Content-Type"), _error_body(response))
    # from_response picks glanceclient's class for the status (HTTPInternalServerError,
    # HTTPNotFound, ...); handed a plain-text body it cannot fail on.
    plain = types.SimpleNamespace(status_code=status, headers={"content-type": "text/plain"})
    error = glance_exc.from_response(plain, detail.encode() if detail else None)
    if not isinstance(error.code, int):  # a status glanceclient has no class for
        error.code = status
    return error


def _reads_the_body(exc: BaseException) -> bool:
    """Whether ``exc`` is glanceclient failing on an error body, not a transport failure."""
    return isinstance(exc, ValueError) or not isinstance(exc, _GLANCE_ERRORS)


@contextlib.contextmanager
def _error_bodies_read() -> Iterator[None]:
    """Around one glanceclient request: its failure to read an error answer of this
    thread's is raised as the HTTP error the answer was (chained to that failure)."""
    try:
        yield
    except glance_exc.HTTPException:
        raise
    except Exception as exc:
        response = getattr(_last_response, "error", None)
        if response is None or not _reads_the_body(exc):
            raise
        LOG.debug(
            "Glance answered HTTP %d with an error body glanceclient cannot read (%s: %s)",
            response.status_code,
            type(exc).__name__,
            exc,
        )
        raise _http_error(response) from exc


def _classify(exc: BaseException) -> _Failure:
    status = _status_of(exc)
    if status is not None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        details = str(getattr(exc, "details", "") or "")
        detail = f"HTTP {status} {phrase}".rstrip()
        if details and details != type(exc).__name__:
            detail += f": {_short(details)}"
        transient = status in (408, 429) or (500 <= status <= 599 and status not in (501, 505))
        return _Failure(transient, status, detail, "glance_endpoint")
    detail = _short(str(exc) or type(exc).__name__)
    # An answer that is no JSON (requests' JSONDecodeError is also a RequestException) or
    # a TLS setting that is wrong now will be the same on the next attempt.
    if isinstance(exc, (glance_exc.HTTPException, _BadResponse, ValueError)) or _in_chain(
        exc, _TLS_ERRORS
    ):
        return _Failure(False, None, detail, "glance_endpoint")
    if _is_timeout(exc):
        return _Failure(True, None, f"timed out: {detail}", "glance_timeout")
    if isinstance(exc, _TRANSPORT_ERRORS):
        return _Failure(True, None, detail, "glance_endpoint")
    return _Failure(False, None, detail, "glance_endpoint")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _GLANCE_ERRORS) and _classify(exc).transient


def _typed(
    image_id: str, operation: str, exc: BaseException, attempts: int
) -> exception.TorrentImagesError:
    """The typed error for ``exc``, naming the image, the operation and the attempts."""
    failure = _classify(exc)
    if failure.status == 404:
        return exception.ImageNotFound(image_id=image_id, operation=operation)
    if failure.status in (401, 403):
        return exception.GlanceForbidden(
            image_id=image_id, operation=operation, status=failure.status, reason=failure.detail
        )
    if failure.transient:
        return exception.GlanceUnavailable(
            image_id=image_id,
            operation=operation,
            attempts=attempts,
            reason=failure.detail,
            option=failure.option,
        )
    return exception.GlanceError(
        image_id=image_id,
        operation=operation,
        attempts=attempts,
        reason=f"could not {operation} it: {failure.detail} (not retried; "
        f"check [torrent_images] {failure.option})",
    )


class _BudgetStop(tenacity.stop.stop_base):
    """Stop retrying when another attempt, as long as the ones so far took on average,
    and the wait before it could not end within the budget: a Glance that refuses at once
    is asked again, one that hangs for the read timeout is not."""

    def __init__(self, budget: float, wait: float) -> None:
        self.budget, self.wait = budget, wait

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        elapsed = retry_state.seconds_since_start or 0.0
        per_attempt = (elapsed - retry_state.idle_for) / max(1, retry_state.attempt_number)
        return elapsed + per_attempt + self.wait > self.budget


def _log_retry(image_id: str, operation: str, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    LOG.warning(
        "Image %s: Glance could not %s it (attempt %d): %s; retrying in %.1fs",
        image_id,
        operation,
        state.attempt_number,
        _classify(exc).detail if exc is not None else "?",
        state.next_action.sleep if state.next_action else 0.0,
    )


class GlanceClient:
    """The few Glance operations this library needs, with typed errors and retries.

    Every failure leaves as :class:`~exception.ImageNotFound` (404),
    :class:`~exception.GlanceForbidden` (401/403), :class:`~exception.GlanceUnavailable`
    (transient, after ``[torrent_images] glance_retries`` retries with exponential backoff
    from ``glance_retry_delay``) or :class:`~exception.GlanceError`, naming the image and
    the operation. Without ``conf`` the options' defaults apply.
    """

    def __init__(self, client: Any, conf: cfg.ConfigOpts | None = None) -> None:
        self.client = client
        self.conf = conf
        _watch_statuses(client)

    @classmethod
    def for_endpoint(
        cls,
        endpoint: str,
        conf: cfg.ConfigOpts | None = None,
        *,
        token: str | None = None,
        timeout: float = 600,
    ) -> GlanceClient:
        """A client for ``endpoint``; without ``token``, Glance must run with noauth."""
        kwargs: dict[str, Any] = {"timeout": timeout, "token": token or "noauth"}
        if not token:
            kwargs["identity_headers"] = dict(NOAUTH_HEADERS)
        return cls(glance_v2.Client(endpoint=endpoint, **kwargs), conf)

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> GlanceClient:
        opts = conf.torrent_images
        if opts.glance_noauth:
            if not opts.glance_endpoint:
                raise exception.ConfigError(
                    option="glance_endpoint", reason="glance_noauth needs an endpoint"
                )
            return cls.for_endpoint(opts.glance_endpoint, conf, timeout=opts.glance_timeout)
        try:
            auth = ks_loading.load_auth_from_conf_options(conf, nti_conf.GLANCE_GROUP)
            session = ks_loading.load_session_from_conf_options(
                conf, nti_conf.GLANCE_GROUP, auth=auth
            )
        except ks_exc.ClientException as exc:
            raise exception.ConfigError(
                option="glance_endpoint",
                reason=f"not set, and no usable Keystone credentials in "
                f"[{nti_conf.GLANCE_GROUP}] ({exc}); set glance_endpoint (with glance_noauth "
                "for a Glance without Keystone) or the auth_type and credentials",
            ) from exc
        kwargs: dict[str, Any] = {"session": session}
        if opts.glance_endpoint:
            kwargs["endpoint"] = opts.glance_endpoint
        return cls(glance_v2.Client(**kwargs), conf)

    @classmethod
    def for_context(cls, context: Any, conf: cfg.ConfigOpts) -> GlanceClient:
        """A client acting as the request's user (Nova's ``RequestContext``), if any.

        With ``[torrent_images] glance_endpoint`` set, the context's token is used against
        it; otherwise the ``[torrent_images_glance]`` Keystone settings apply.
        """
        opts = conf.torrent_images
        token = getattr(context, "auth_token", None)
        if opts.glance_endpoint and (token or opts.glance_noauth):
            return cls.for_endpoint(
                opts.glance_endpoint,
                conf,
                token=None if opts.glance_noauth else token,
                timeout=opts.glance_timeout,
            )
        return cls.from_conf(conf)

    # -- retries -----------------------------------------------------------------------
    def _option(self, name: str) -> Any:
        if self.conf is None:
            return _DEFAULTS[name]
        return getattr(self.conf.torrent_images, name)

    def _retrying(
        self,
        image_id: str,
        operation: str,
        retries: int | None = None,
        budget: float | None = None,
    ) -> tenacity.Retrying:
        """The retry policy: transient failures only, exponential backoff with jitter;
        with ``budget``, no retry that could not end within it."""
        if retries is None:
            retries = self._option("glance_retries")
        delay = float(self._option("glance_retry_delay"))
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(retries + 1)
        if budget is not None:
            stop = stop | _BudgetStop(budget, delay)
        return tenacity.Retrying(
            stop=stop,
            # The first wait is glance_retry_delay, then it doubles (at most a minute); up
            # to half of glance_retry_delay is added at random to every wait, so that hosts
            # that failed together do not retry together.
            wait=tenacity.wait_exponential(multiplier=delay, max=max(delay, MAX_RETRY_DELAY))
            + tenacity.wait_random(0, delay / 2),
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=lambda state: _log_retry(image_id, operation, state),
            reraise=True,
        )

    def _call(
        self,
        image_id: str,
        operation: str,
        fn: Callable[[], T],
        *,
        retries: int | None = None,
        before_attempt: Callable[[], None] | None = None,
        budget: float | None = None,
    ) -> T:
        """``fn()`` with retries; any failure of Glance is raised typed.

        ``budget``: no retry that could not end within this many seconds of the first
        attempt (see :class:`_BudgetStop`)."""
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            _forget_last_response()
            if before_attempt is not None:
                before_attempt()
            with _error_bodies_read():
                return fn()

        try:
            return self._retrying(image_id, operation, retries, budget)(attempt)
        except _GLANCE_ERRORS as exc:
            raise _typed(image_id, operation, exc, attempts) from exc

    # -- records -----------------------------------------------------------------------
    def get_image(self, image_id: str) -> dict[str, Any]:
        """The image's record; a Glance slow to answer fails in seconds, not minutes.

        ``glance_connect_timeout`` and ``glance_read_timeout`` bound each attempt, and the
        attempts together stay within ``glance_metadata_budget``: a boot that cannot get
        the record in time goes the way of a boot while Glance is down (the record kept
        with a verified base copy, within ``offline_boot_max_age``).
        """
        timeout = (
            float(self._option("glance_connect_timeout")),
            float(self._option("glance_read_timeout")),
        )
        url = f"/v2/images/{urllib.parse.quote(image_id, safe='')}"

        def show() -> dict[str, Any]:
            resp = self._raw_get(url, {"Accept": "application/json"}, stream=False, timeout=timeout)
            try:
                body = resp.json()
            except ValueError as exc:
                raise _BadResponse(f"the record is not JSON: {_short(resp.text)}") from exc
            finally:
                resp.close()
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise _BadResponse(f"the record is not an image: {_short(str(body))}")
            return body

        return self._call(
            image_id,
            SHOW,
            show,
            budget=float(self._option("glance_metadata_budget")),
        )

    def image_info(self, image_id: str) -> ImageInfo:
        kwargs = {}
        if self.conf is not None:
            kwargs = {
                "torrentable_property": self.conf.torrent_images.torrentable_property,
                "magnet_property": self.conf.torrent_images.magnet_property,
                "bound_hash_property": self.conf.torrent_images.bound_hash_property,
            }
        return parse_image(self.get_image(image_id), **kwargs)

    def set_properties(self, image_id: str, **properties: str) -> None:
        # Setting a property to a value is idempotent, so a retry is safe.
        self._call(image_id, UPDATE, lambda: self.client.images.update(image_id, **properties))

    def remove_properties(self, image_id: str, names: Iterable[str]) -> None:
        names = list(names)
        self._call(
            image_id, REMOVE, lambda: self.client.images.update(image_id, remove_props=names)
        )

    # -- data --------------------------------------------------------------------------
    def upload(self, image_id: str, data: Any, size: int) -> None:
        """Upload image data (a file object) to an image record Nova created.

        A retry must send the data again from the start, so only a seekable ``data`` is
        retried (rewound to where it was); a stream gets one attempt.
        """
        try:
            origin = data.tell() if data.seekable() else None
        except (AttributeError, OSError):
            origin = None

        def rewind() -> None:
            if origin is not None:
                data.seek(origin)

        self._call(
            image_id,
            UPLOAD,
            lambda: self.client.images.upload(image_id, data, image_size=size),
            retries=None if origin is not None else 0,
            before_attempt=rewind,
        )

    def iter_data(self, image_id: str) -> Iterator[bytes]:
        """The image's data in chunks, as one stream however often the transfer broke.

        The first request (and its retries) is made before this returns, so a missing
        image or a refusal raises here; failures while iterating raise typed errors too.
        """
        stream = self._stream(image_id)
        try:
            first = next(stream)
        except StopIteration:
            return iter(())
        return _prepend(first, stream)

    def _stream(self, image_id: str) -> Generator[bytes, None, None]:
        # A transient failure part way through the body (a reset, a truncated body, a
        # stall past glance_timeout) is retried from the byte reached, with a Range
        # request (sent beside glanceclient, whose request layer percent-encodes header
        # values: see _ranged_get). Glance honours Range on its file store only (400 on
        # the others): there, the image is read again from its first byte and the part
        # already handed on is dropped. Either way the consumer sees one stream:
        # download() keeps its hasher and its file position (no rewind of a device, no
        # rewrite of what is on disk) and other users of iter_data() get no bytes twice.
        # Stitching is safe: the consumer checks length and hash of the whole against the
        # Glance record, and an active Glance image never changes.
        delivered = 0  # bytes handed on so far
        attempts = 0
        try:
            for attempt in self._retrying(image_id, DOWNLOAD):
                with attempt:
                    attempts += 1
                    with contextlib.closing(self._read_after(image_id, delivered)) as body:
                        for chunk in body:
                            delivered += len(chunk)
                            yield chunk
        except _GLANCE_ERRORS as exc:
            raise _typed(image_id, DOWNLOAD, exc, attempts) from exc
        # GeneratorExit (the consumer stopped early) is not transient: tenacity's attempt
        # records it and raises it again at once, so closing this generator just works.

    def _read_after(self, image_id: str, skip: int) -> Generator[bytes, None, None]:
        """One request for the image's data; yields what follows its first ``skip`` bytes.

        The first request is the one ``images.data()`` makes; it is made here so that the
        response is at hand, to check and to close when the consumer stops early. Later
        ones (``skip``: the bytes handed on before a break) ask for the rest with a
        ``Range``; a Glance that sends the whole image instead has its first bytes dropped.
        """
        _forget_last_response()
        url = _data_url(image_id)
        resp: Any = None
        if skip:
            resp = self._ranged_get(url, skip, None)
            if resp is not None and resp.status_code == http.HTTPStatus.PARTIAL_CONTENT:
                LOG.info("Image %s: Glance download resumed at byte %d", image_id, skip)
                skip = 0
            body = resp.iter_content(RESUME_CHUNK) if resp is not None else None
        if resp is None:
            with _error_bodies_read():
                resp, body = self.client.http_client.get(url)
        try:
            if resp.status_code == http.HTTPStatus.NO_CONTENT or body is None:
                raise _BadResponse("the image has no data")
            content_type = resp.headers.get("Content-Type")
            if content_type != "application/octet-stream":
                raise _BadResponse(f"the data came as {content_type!r}, not octet-stream")
            expected = skip
            for chunk in body:
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if chunk:
                    yield chunk
            if skip:
                raise _BadResponse(f"the data read again ended before byte {expected}")
        finally:
            resp.close()

    def read_range(self, image_id: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (inclusive) of the image's data: one ``Range`` request.

        Retried like every call; a Glance that ignores the range (a store other than
        ``file`` answers 400, a proxy may answer 200) is a :class:`~exception.GlanceError`.
        """
        attempts = 0
        url = _data_url(image_id)
        try:
            for attempt in self._retrying(image_id, DOWNLOAD):
                with attempt:
                    attempts += 1
                    resp = self._ranged_get(url, start, end)
                    if resp is None or resp.status_code != http.HTTPStatus.PARTIAL_CONTENT:
                        if resp is not None:
                            resp.close()
                        raise _BadResponse(f"Glance did not answer bytes {start}-{end} alone")
                    try:
                        data = resp.raw.read(end - start + 2, decode_content=False)
                    finally:
                        resp.close()
                    if len(data) != end - start + 1:
                        raise http.client.IncompleteRead(data, end - start + 1 - len(data))
                    return data
        except _GLANCE_ERRORS as exc:
            raise _typed(image_id, DOWNLOAD, exc, attempts) from exc
        raise AssertionError("unreachable")

    def _ranged_get(self, url: str, start: int, end: int | None) -> requests.Response | None:
        """The streamed answer to ``Range: bytes=start-[end]``: 206 with that range, or 200
        with the whole image (a server that ignores ranges); None when ranges are refused.

        Sent on the client's own session, beside glanceclient's request layer: that one
        percent-encodes header values (``bytes%3D0-``), which a server ignores. An error
        status raises the HTTPException glanceclient would have raised.
        """
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"}
        # 400: a store other than Glance's file store refuses ranges; 416: none to give.
        resp = self._raw_get(url, headers, stream=True, accept=(400, 416))
        if resp.status_code in (400, 416):
            resp.close()
            return None
        content_range = resp.headers.get("Content-Range", "")
        wanted = f"bytes {start}-" if end is None else f"bytes {start}-{end}/"
        if resp.status_code == 206 and not content_range.startswith(wanted):
            resp.close()
            raise _BadResponse(f"asked for {headers['Range']}, got Content-Range {content_range!r}")
        return resp  # 206 with the range asked for, or 200 with the whole image

    def _raw_get(
        self,
        url: str,
        headers: dict[str, str],
        *,
        stream: bool,
        timeout: float | tuple[float, float] | None = None,
        accept: tuple[int, ...] = (),
    ) -> requests.Response:
        """``GET url`` on the client's own session, as glanceclient would send it (token,
        identity headers, endpoint) but with these headers as they are and this timeout
        (``(connect, read)``; default: the client's). A status >= 400 not in ``accept``
        raises the HTTPException glanceclient would have raised."""
        http_client = self.client.http_client
        headers = dict(headers)
        if isinstance(http_client, glance_http.SessionClient):
            # keystoneauth adds the token and finds the image endpoint.
            extra = {"timeout": timeout} if timeout is not None else {}
            resp = ks_adapter.Adapter.request(
                http_client, url, "GET", headers=headers, stream=stream, raise_exc=False, **extra
            )
        else:
            headers.update(http_client.identity_headers or {})
            headers.setdefault("X-Auth-Token", http_client.auth_token)
            resp = http_client.session.get(
                http_client.endpoint.rstrip("/") + url,
                headers=headers,
                stream=stream,
                timeout=timeout if timeout is not None else http_client.timeout,
            )
        if resp.status_code >= 400 and resp.status_code not in accept:
            try:
                detail = resp.raw.read(300, decode_content=True).decode("utf-8", "replace")
            finally:
                resp.close()
            error = glance_exc.HTTPException(details=detail or resp.reason)
            error.code = resp.status_code
            raise error
        return resp

    def download(
        self,
        image: ImageInfo,
        destination: str,
        *,
        verify_hash: bool = True,
        preallocated: bool = False,
    ) -> int:
        """Stream the image into ``destination`` and verify it; return bytes written.

        ``destination`` is a new file, or with ``preallocated`` a file or device owned by
        the caller (written in place, never removed here). On any error a new file is
        removed again; the hash is checked before returning, so a mismatch never escapes.
        Transfer failures are retried by :meth:`iter_data`, which keeps one stream.
        """
        image.require_verifiable()
        hasher = image.new_hasher()
        written = 0
        start = time.monotonic()
        in_place = preallocated or verify.is_block_device(destination)
        try:
            with open(destination, "r+b" if in_place else "wb") as out:
                for chunk in self.iter_data(image.id):
                    out.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
                    if written > image.size:
                        break
                out.flush()
                utils.fsync(out.fileno())
            verify.check_digest(image, written, hasher.hexdigest() if verify_hash else None)
        except BaseException:
            if not in_place:
                verify.discard(destination)
            raise
        LOG.info(
            "Image %s: %d MiB downloaded from Glance over HTTP in %.1fs and verified (%s)",
            image.id,
            written >> 20,
            time.monotonic() - start,
            image.hash_algo if verify_hash else "length only",
        )
        return written


def _data_url(image_id: str) -> str:
    return f"/v2/images/{urllib.parse.quote(image_id, safe='')}/file"


def _prepend(first: bytes, rest: Generator[bytes, None, None]) -> Iterator[bytes]:
    try:
        yield first
        yield from rest
    finally:
        rest.close()
