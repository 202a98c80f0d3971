"""Credentials never reach logs, MLflow params or uploaded configs.

Two places hide them: a field whose *name* is a credential (`hf_token`, `api_key`, `password`, ...,
matched as a whole name, so `tokenize.cutoff_len` and `evaluate.max_new_tokens` stay visible), and
any string value that is a URI carrying a password (`https://user:pw@host`) or a secret in its query
string (`?token=...`, `X-Amz-Signature=...`), wherever in the config it sits.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
_SECRET_NAMES = {
    "token", "hf_token", "api_token", "access_token", "auth_token", "refresh_token", "id_token", "bearer",
    "password", "passwd", "secret", "client_secret", "api_key", "apikey", "secret_key", "access_key",
    "private_key", "credential", "credentials", "authorization",
}
# Query parameters that carry a secret in signed URLs (Azure SAS `sig`, `key=` APIs); as config
# field names they are too common to mask.
_SECRET_QUERY_NAMES = {"sig", "signature", "key", "code"}
_SECRET_SUFFIXES = ("_password", "_secret", "_api_key", "_apikey", "_secret_key", "_access_key", "_private_key",
                    "_auth_token", "_access_token", "_api_token", "-signature", "-credential", "-security-token")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_secret_name(name: str) -> bool:
    """True for a field or query parameter named like a credential (the last dotted part counts)."""
    last = name.rsplit(".", 1)[-1].lower()
    return last in _SECRET_NAMES or last.endswith(_SECRET_SUFFIXES)


def redact_uri(value: str) -> str:
    """`value` with a URI's password and secret query parameters replaced by ***; other strings as they are."""
    if not _URI.match(value):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    out = value
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        out = out.replace(parts.netloc, f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        secret = [is_secret_name(k) or k.lower() in _SECRET_QUERY_NAMES for k, _ in pairs]
        if any(secret):
            masked = urlencode([(k, MASK if s else v) for (k, v), s in zip(pairs, secret)], safe="*")
            out = out.replace("?" + parts.query, "?" + masked, 1)
    return out  # rebuilt by replacement: urlunsplit would rewrite sqlite:////abs paths


def mask_secrets(data: Any, name: str = "") -> Any:
    """A copy of a config dump (dicts, lists, scalars) with credentials masked by name and in URIs."""
    if isinstance(data, dict):
        return {k: MASK if is_secret_name(str(k)) and data[k] is not None else mask_secrets(v, str(k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v, name) for v in data]
    if isinstance(data, str):
        return redact_uri(data)
    return data
