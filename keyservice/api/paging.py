"""Key Vault's paging: `maxresults` (1..25) per page and a `nextLink` to the rest.

The link carries an opaque `$skiptoken`: the sort key of the page's last item (a key's
name; a version's position, versions being append-only), so items added while a client
pages neither repeat nor shift what it has seen. The link is built from the service's
configured address (api/addressing.py), never from the request's Host header.

Path-form calls without `maxresults` get every item in one answer, as this service's own
clients always did; host-form calls (the Azure SDKs) get Key Vault's default page of 25.
"""
import base64
import binascii
import json
from urllib.parse import urlencode

from ..domain.errors import BadRequest
from .addressing import is_host_form
from .body import query_int

MAX_RESULTS = 25  # Key Vault refuses more per page


def _token(after) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).rstrip(b"=").decode()


def _after(token: str):
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after = data["after"]
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise BadRequest("$skiptoken is not one this service issued") from None
    if not isinstance(after, (str, int)) or isinstance(after, bool):
        raise BadRequest("$skiptoken is not one this service issued")
    return after


def page(request, base_url: str, items: list, sort_key) -> dict:
    """`{"value": [...], "nextLink": url | None}` for `items` (in `sort_key` order);
    `base_url` is where the caller reached the collection (scheme, host, path)."""
    size = query_int(request, "maxresults", None, 1, MAX_RESULTS)
    if size is None and not is_host_form(request):
        size = len(items) or 1
    size = size or MAX_RESULTS
    token = request.query.get("$skiptoken")
    if token:
        after = _after(token)
        try:
            items = [i for i in items if sort_key(i) > after]
        except TypeError:  # a token of another collection's kind
            raise BadRequest("$skiptoken is not one this service issued") from None
    chosen, rest = items[:size], items[size:]
    link = None
    if rest:
        query = {"$skiptoken": _token(sort_key(chosen[-1])), "maxresults": size}
        if "api-version" in request.query:
            query["api-version"] = request.query["api-version"]
        link = f"{base_url}?{urlencode(query)}"
    return {"chosen": chosen, "nextLink": link}
