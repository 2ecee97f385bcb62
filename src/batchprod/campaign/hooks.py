"""Incident hooks: hand each incident to the operator's commands and HTTP endpoints.

The dispatcher only calls :meth:`IncidentHooks.notify`, which queues the incident id and returns at once;
one background thread delivers, so a slow or dead receiver never holds up a control interval. A failed
delivery is retried with exponential back-off (``backoff``, ``2*backoff``, ... capped at ``max_backoff``),
since receivers (chat bridges, pagers, ticket systems) do go away for a while. The outcome is recorded on
the incident (``delivered`` / ``hook_error``, one line naming the hook without its secrets); nothing is
ever raised into the dispatcher.

A command hook (argv list, or a string split with :func:`shlex.split`, never a shell) gets the incident as
JSON on stdin and its id in ``$BATCHPROD_INCIDENT_ID``; it failed if it exits non-zero or outlives
``timeout``. An HTTP hook is a POST of the same JSON; connection errors, timeouts, 429 and 5xx are retried,
any other non-2xx answer (redirects too: they are not followed) is final. ``user:password@`` in the URL
becomes HTTP Basic authentication.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import shlex
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from batchprod import __version__
from batchprod.errors import ConfigError
from batchprod.state.database import redact

if TYPE_CHECKING:
    from batchprod.campaign.db import CampaignDB

_log = logging.getLogger(__name__)

#: the environment variable naming the incident for a command hook
INCIDENT_ID_ENV = "BATCHPROD_INCIDENT_ID"


def incident_payload(incident: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object a hook receives: the incident, ``first``/``last`` as ISO-8601 UTC times (the epoch
    seconds in ``first_epoch``/``last_epoch``) and ``"source": "batchprod"``."""
    out = dict(incident)
    for key in ("first", "last"):
        value = out.get(key)
        if isinstance(value, int | float):
            out[f"{key}_epoch"] = value
            out[key] = datetime.fromtimestamp(value, UTC).isoformat()
    out["source"] = "batchprod"
    return out


@dataclass(frozen=True)
class _Failure:
    what: str  # one line, no secrets
    retry: bool


class _Hook(Protocol):
    name: str

    def send(self, body: bytes, incident_id: int, timeout: float) -> _Failure | None: ...

    def scrub(self, text: str) -> str: ...


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _CommandHook:
    def __init__(self, command: str | Sequence[str]) -> None:
        if isinstance(command, str):
            try:
                argv = shlex.split(command)
            except ValueError as e:
                raise ConfigError(f"incident hook command {command!r}: {e}") from None
        else:
            argv = [str(a) for a in command]
        if not argv or not argv[0]:
            raise ConfigError(f"incident hook command {command!r}: no program to run")
        self.argv = argv
        # the program only: its arguments may hold a token
        self.name = f"command {argv[0]!r}"

    def scrub(self, text: str) -> str:
        return text

    def send(self, body: bytes, incident_id: int, timeout: float) -> _Failure | None:
        env = {**os.environ, INCIDENT_ID_ENV: str(incident_id)}
        # stderr to a file, not a pipe: a child the hook leaves behind cannot keep us waiting for EOF
        with tempfile.TemporaryFile() as err:
            try:
                p = subprocess.run(self.argv, input=body, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                   timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                return _Failure(f"still running after {timeout:g} s (killed)", retry=True)
            except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
                return _Failure(f"cannot run it: {e.strerror or e}", retry=False)
            except OSError as e:
                return _Failure(f"cannot start it: {e.strerror or e}", retry=True)
            if p.returncode == 0:
                return None
            err.seek(0)
            lines = [ln for ln in err.read()[-4096:].decode(errors="replace").splitlines() if ln.strip()]
        status = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit status {p.returncode}"
        return _Failure(status + (f" ({_one_line(lines[-1])})" if lines else ""), retry=True)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer of its own: urllib would turn the POST into a GET without its body (and
    send the credentials on to wherever the redirect points)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


class _HttpHook:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        try:
            _ = parts.port  # raises on a port that is not a number
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            raise ConfigError(f"incident hook URL {redact(url).split('?', 1)[0]!r}: not an http:// or "
                              "https:// URL with a host")
        hostport = parts.netloc.rpartition("@")[2]
        self.target = urlunsplit((parts.scheme, hostport, parts.path or "/", parts.query, ""))
        self.headers = {"Content-Type": "application/json", "User-Agent": f"batchprod/{__version__}"}
        secrets: list[str] = []
        userinfo = ""  # as shown: the password masked
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            secrets += [parts.password or "", password, token]
            userinfo = f"{parts.username}:***@" if parts.password is not None else f"{parts.username}@"
        query = parse_qsl(parts.query, keep_blank_values=True)
        secrets += [v for _, v in query] + [pair.partition("=")[2] for pair in parts.query.split("&")]
        public_query = "&".join(f"{k}=***" for k, _ in query)
        self.public = urlunsplit((parts.scheme, userinfo + hostport, parts.path, public_query, ""))
        self.name = f"POST {self.public}"
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)
        self._opener = urllib.request.build_opener(_NoRedirect)

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def send(self, body: bytes, incident_id: int, timeout: float) -> _Failure | None:
        req = urllib.request.Request(self.target, data=body, headers=self.headers, method="POST")
        try:
            with self._opener.open(req, timeout=timeout):
                return None  # 2xx: anything else is raised as an HTTPError
        except urllib.error.HTTPError as e:
            e.close()
            what = f"HTTP {e.code} {_one_line(str(e.reason), 80)}".rstrip()
            if 300 <= e.code < 400:
                return _Failure(what + " (redirects are not followed: configure the final URL)", retry=False)
            return _Failure(what, retry=e.code >= 500 or e.code == 429)
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                return _Failure(f"no answer within {timeout:g} s", retry=True)
            reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
            return _Failure(f"cannot connect: {_one_line(str(reason))}", retry=True)
        except TimeoutError:
            return _Failure(f"no answer within {timeout:g} s", retry=True)
        except Exception as e:  # the connection dropped, a malformed answer, ...: worth another try
            return _Failure(f"{type(e).__name__}: {_one_line(str(e))}".rstrip(": "), retry=True)


class IncidentHooks:
    """Deliver incidents to the configured hooks from one daemon thread.

    ``retries`` is the number of tries per hook and incident in all (1: no retry). An incident is
    recorded as delivered when at least one hook took it; ``hook_error`` names every hook that did not
    (one line), or is cleared when all did.
    """

    def __init__(self, db: CampaignDB, commands: Sequence[str | Sequence[str]] = (), urls: Sequence[str] = (),
                 retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 10.0) -> None:
        if isinstance(commands, str) or isinstance(urls, str):
            raise ConfigError("incident hooks: commands and urls are lists (one entry per hook)")
        if retries < 1:
            raise ConfigError(f"incident hooks: retries must be at least 1 (tries in all), not {retries}")
        if backoff < 0 or max_backoff < 0:
            raise ConfigError("incident hooks: backoff and max_backoff must not be negative")
        if timeout <= 0:
            raise ConfigError(f"incident hooks: timeout must be positive, not {timeout:g}")
        self.db = db
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._hooks: list[_Hook] = [_CommandHook(c) for c in commands] + [_HttpHook(u) for u in urls]
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._queued: set[int] = set()  # waiting, not yet started: a second notify adds nothing
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self._hooks:
            self._thread = threading.Thread(target=self._run, name="batchprod-incident-hooks", daemon=True)
            self._thread.start()

    @property
    def hooks(self) -> list[str]:
        """The configured hooks, as named in errors (no secrets)."""
        return [h.name for h in self._hooks]

    def notify(self, incident_id: int) -> None:
        """Queue the incident for delivery and return at once (its newest state is what is sent)."""
        with self._lock:
            if self._thread is None or self._closed or incident_id in self._queued:
                return
            self._queued.add(incident_id)
            self._queue.put(incident_id)  # under the lock: never behind close()'s end marker

    def close(self, timeout: float | None = 30.0) -> bool:
        """Deliver what is queued, waiting up to ``timeout`` seconds, and stop the thread. False when time
        ran out: retries then stop and what is still queued is recorded as not delivered."""
        with self._lock:
            if self._thread is None:
                return True
            if not self._closed:
                self._queue.put(None)
            self._closed = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            return False
        return True

    def __enter__(self) -> IncidentHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            iid = self._queue.get()
            if iid is None:
                return
            with self._lock:
                self._queued.discard(iid)
            try:
                if self._stop.is_set():
                    self.db.delivered(iid, False, "not delivered: the hooks were closed first")
                else:
                    self._deliver(iid)
            except Exception as e:  # the database, most likely: one line, and on with the next
                _log.warning("incident %s: hook delivery not recorded: %s: %s", iid, type(e).__name__,
                             _one_line(str(e)))

    def _deliver(self, iid: int) -> None:
        incident = self.db.incident(iid)
        if incident is None:
            _log.warning("incident %s: no such incident, nothing delivered", iid)
            return
        body = json.dumps(incident_payload(incident), default=str).encode()
        errors = [e for e in (self._try(h, body, iid) for h in self._hooks) if e is not None]
        self.db.delivered(iid, len(errors) < len(self._hooks), "; ".join(errors) or None)

    def _try(self, hook: _Hook, body: bytes, iid: int) -> str | None:
        """None once the hook took the incident, else one line saying why not."""
        tries = 0
        while True:
            tries += 1
            try:
                failure = hook.send(body, iid, self.timeout)
            except Exception as e:  # a bug of ours must not stop the thread
                failure = _Failure(f"{type(e).__name__}: {_one_line(str(e))}", retry=True)
            if failure is None:
                return None
            if not failure.retry or tries >= self.retries:
                break
            delay = min(self.backoff * 2 ** (tries - 1), self.max_backoff)
            if self._stop.wait(delay):
                return (f"{hook.name}: {hook.scrub(failure.what)}, after {tries} {_tries(tries)} "
                        "(stopped: the hooks were closed)")
        # the name has its secrets masked already; the rest may quote what a server or an exception said
        return f"{hook.name}: {hook.scrub(failure.what)}, after {tries} {_tries(tries)}"


def _tries(n: int) -> str:
    return "try" if n == 1 else "tries"
