"""Noticing, within seconds, that the Prefect server a run talks to has stopped answering.

Prefect's client retries a failed request with growing back-off (about a minute per call),
and a run makes many calls, so on its own a driver whose server died would keep starting
sessions and print tracebacks for minutes. A :class:`ServerWatch` polls the server's
``/health`` once a second from a thread of its own; after a few misses in a row it declares
the server lost and tells whoever asked (:meth:`ServerWatch.on_lost`): the dispatcher then
starts nothing new and lets running sessions commit, the flow writes the RunReport to the
run journal, and the CLI prints one line with the ``claudecluster resume`` command.

One watch serves every run of a process that talks to the same server (:func:`watch_for`).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

_log = logging.getLogger("claudecluster.server_watch")

# Loopback requests must never go through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

INTERVAL_S = 1.0
MISSES = 3  # in a row: a server busy with a burst of writes still answers /health


class ServerWatch:
    """Polls ``<api_url>/health``; after ``misses`` failures in a row the server is lost."""

    def __init__(
        self, api_url: str, *, interval_s: float = INTERVAL_S, misses: int = MISSES
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.interval_s, self.misses = interval_s, misses
        self.lost = threading.Event()
        self.lost_at: float | None = None  # time.time() of the first miss of the lost streak
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="server-watch", daemon=True)
        self._thread.start()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the watch's thread) once the server is lost; at once if it is."""
        with self._lock:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def close(self) -> None:
        """Stop polling."""
        self._stopped.set()

    def answers(self) -> bool:
        """True when ``/health`` answers now."""
        try:
            with _OPENER.open(f"{self.api_url}/health", timeout=self.interval_s) as response:
                return bool(200 <= response.status < 300)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _poll(self) -> None:
        missed = 0
        first_miss = 0.0
        while not self._stopped.wait(self.interval_s):
            if self.answers():
                missed = 0
                continue
            missed += 1
            first_miss = first_miss if missed > 1 else time.time()
            if missed >= self.misses:
                self._declare_lost(first_miss)
                return

    def _declare_lost(self, since: float) -> None:
        with self._lock:
            self.lost_at = since
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
        _log.info("the Prefect server at %s stopped answering", self.api_url)
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one broken listener must not keep the others from hearing
                _log.exception("a server-lost listener failed")


_WATCHES: dict[str, ServerWatch] = {}
_WATCHES_LOCK = threading.Lock()


def watch_for(api_url: str | None) -> ServerWatch | None:
    """The process's watch of ``api_url`` (started on first use); None without a URL."""
    if not api_url:
        return None
    key = api_url.rstrip("/")
    with _WATCHES_LOCK:
        watch = _WATCHES.get(key)
        if watch is None or watch.lost.is_set():
            watch = _WATCHES[key] = ServerWatch(key)
        return watch


def current_watch() -> ServerWatch | None:
    """The watch of the Prefect server this process is configured for."""
    from prefect.settings import get_current_settings

    return watch_for(get_current_settings().api.url)
