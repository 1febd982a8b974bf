"""`--serve`: the report on a loopback HTTP server, rebuilt while the run writes (only changed record files are
read again); an open page reloads itself when a rebuild brings new data."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import threading

from fr_jax.view.report import ReportBuilder

_log = logging.getLogger(__name__)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        _log.debug(format, *args)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class LiveReport:
    """Serves `builder`'s output at http://host:port/ and rebuilds it every `every_s` seconds."""

    def __init__(self, builder: ReportBuilder, *, host: str = "127.0.0.1", port: int = 0, every_s: float = 5.0):
        self.builder = builder
        self.every_s = every_s
        builder.build()
        handler = functools.partial(_QuietHandler, directory=str(builder.out_dir))
        self.server = http.server.ThreadingHTTPServer((host, port), handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="fr_jax-view-http", daemon=True),
            threading.Thread(target=self._rebuild, name="fr_jax-view-build", daemon=True),
        ]

    def start(self) -> LiveReport:
        for thread in self._threads:
            thread.start()
        return self

    def _rebuild(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                done = self.builder.build()
            except (OSError, ValueError, json.JSONDecodeError) as err:  # a file caught mid-write: next time
                _log.warning("rebuilding the report failed (%s); retrying in %.0f s", err, self.every_s)
                continue
            if done["files_read"]:
                _log.info("report rebuilt: %d samples (%d new record files)", done["samples"], done["files_read"])

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> LiveReport:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
