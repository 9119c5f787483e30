"""Hugging Face hub access on a machine that may have no network.

huggingface_hub retries a failed request five times with backoff, so on an offline machine a hub
id (a model, a tokenizer, a dataset) took ~25 s per file, with a "Retrying in 8s" line each time,
before the error. When the hub's host cannot be reached at all, this process is put in offline
mode instead: hub ids are read from the local cache, and a missing one fails at once.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.request
from urllib.parse import urlparse

CONNECT_TIMEOUT = 3.0


@functools.cache
def offline_unless_reachable() -> bool:
    """Before a hub id is loaded: True if this process now reads the hub from the cache only
    (already so by HF_HUB_OFFLINE, or the hub's host, ``HF_ENDPOINT``'s if set, did not answer)."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT
    host, port = _first_hop(endpoint)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return False
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    _set_offline()
    from wprctl.console import err_console, is_main_process

    if is_main_process():
        err_console.print(
            f"[dim]{host} cannot be reached ({reason}): hub ids are read from the local cache "
            "only (as with HF_HUB_OFFLINE=1)[/]"
        )
    return True


def _first_hop(endpoint: str) -> tuple[str, int]:
    """The host and port a request to ``endpoint`` connects to first: the proxy the environment
    names for it (HTTPS_PROXY and the like, unless NO_PROXY exempts the host), else the host."""
    url = urlparse(endpoint)
    scheme = url.scheme or "https"
    host = url.hostname or "huggingface.co"
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(scheme)
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        scheme, host = url.scheme, url.hostname or host
    return host, url.port or (443 if scheme == "https" else 80)


def _set_offline() -> None:
    import huggingface_hub.constants as hub_constants

    # the libraries read these flags at call time; the variable covers child processes
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:  # pragma: no cover
        return
    datasets.config.HF_HUB_OFFLINE = True
