"""A client for pgfresh's fragment server (`listen --serve ADDR`), with Python's standard library only,
so that any site can copy this file as it is.

`pgfresh_get(key)` returns a fragment's HTML for a key written as pgfresh stores it in plain format
("shop:product_card:42:full"): what Redis holds, or, on a miss, a render pgfresh makes now, stores
through its checked write, and answers. A site that reads its cache first and asks pgfresh only on
a miss keeps no copy of the fragment's markup of its own, and pgfresh stays the only writer of the
cache (a site that stored its own live render could overwrite a newer one of pgfresh's).

`fresh=True` asks for a render from current rows even when Redis holds the entry: for a page shown
right after the caller's own commit (read-your-writes).
"""

import logging
import urllib.error
import urllib.parse
import urllib.request

logger = logging.getLogger(__name__)

# A miss waits this long at most: a page with a placeholder beats a slow page.
DEFAULT_TIMEOUT = 0.2


def pgfresh_get(key, url="http://127.0.0.1:9188", token="", timeout=DEFAULT_TIMEOUT, fresh=False):
    """The HTML of fragment entry `key` from pgfresh at `url` (its --serve address), or None when
    the key's row does not exist (404) or pgfresh cannot answer within `timeout` seconds (logged as
    a warning, with the reason pgfresh gave)."""
    path = "/fragments/" + urllib.parse.quote(key, safe=":")
    if fresh:
        path += "?fresh=1"
    request = urllib.request.Request(url.rstrip("/") + path)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            reason = error.read(500).decode("utf-8", "replace").strip()
            logger.warning("pgfresh could not answer for %s: %s %s", key, error.code, reason)
        return None
    except (urllib.error.URLError, OSError) as error:
        logger.warning("pgfresh did not answer for %s within %.3f s: %s", key, timeout, error)
        return None
