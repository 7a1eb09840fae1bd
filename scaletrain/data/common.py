"""What every part of the data package shares: the end-of-text token, DataError, content digests, the
reachability probe used before clients that retry for minutes (datasets, W&B)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.parse

from scaletrain.config import BadInput

EOT = "<|endoftext|>"
CACHE_VERSION = "2"  # bump when the cache layout or the text parsing changes (2: per-source entries)

log = logging.getLogger("scaletrain.data")


class DataError(BadInput, RuntimeError):
    """The data cannot be loaded as configured; the message names the path or key and the fix."""

    kind = "data"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def digest(*parts: object) -> str:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the hub is never asked (datasets reads its local cache)."""
    return env_true("HF_HUB_OFFLINE") or env_true("HF_DATASETS_OFFLINE")


def hub_failure(timeout_s: float) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT, default huggingface.co) cannot be reached within `timeout_s`,
    as "<endpoint> (<reason>)"; None when it can or when offline mode is set (the cache answers instead)."""
    if hub_offline():
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    failure = unreachable(endpoint, timeout_s)
    return f"{endpoint} ({failure})" if failure else None


def unreachable(endpoint: str, timeout_s: float) -> str | None:
    """Why a TCP connection to `endpoint` (a URL) failed within `timeout_s` (None when it succeeded): the
    quick probe before a client that would retry for a long time (datasets, W&B)."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    failure: list[str] = ["timed out"]

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            failure.clear()
        except OSError as err:
            failure[0] = str(err)

    # A thread because name resolution ignores the socket timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return failure[0] if failure else None
