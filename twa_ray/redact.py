"""Credentials never leave the command line: one redaction for every URI, text and record that is
shown or saved.

A storage URI may carry credentials: user-info (``s3://KEY:SECRET@bucket/prefix``) and query
options named like a key, token, secret, password, session or signature
(``?access_key=...&secret_key=...&session_token=...``). Every place that prints or writes a URI
or a config passes it through :func:`redact` first::

    s3://KEY:SECRET@bkt/p?endpoint_override=h:9000&session_token=T
 -> s3://***@bkt/p?endpoint_override=h:9000&session_token=***

and the values of the credential environment variables (:data:`CREDENTIAL_ENV`) and of the
credentials of every URI opened in this process are masked wherever they appear in a text. A
redacted URI read back (``--resume``, a reused ``config.yaml``) is made usable again by
:func:`restore`: the credentials of the same bucket given on this command line, else none (the
environment's, an instance profile's). A command masks every log record of its process when it
starts (:func:`install`, also called first thing on every Ray worker of ours, so their log files
are masked too) and the console as well (:func:`mask_console`); importing this module changes
nothing.

>>> redact("s3://AK:SK@bkt/p?endpoint_override=h:1&secret_key=SK")
's3://***@bkt/p?endpoint_override=h:1&secret_key=***'
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any
from urllib.parse import unquote

__all__ = [
    "MASK",
    "CREDENTIAL_ENV",
    "redact",
    "remember",
    "restore",
    "install",
    "mask_console",
    "RedactingStream",
]

MASK = "***"

CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "RAY_AUTH_TOKEN",
    "HF_TOKEN",
)
"""Environment variables whose values are masked in every text shown or saved."""

_MIN_LITERAL = 8  # shorter values (moto's "testing") are not masked as plain words

# scheme://USERINFO@ : everything up to the first @ (a raw / in a secret included)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^\s'\"@]+)@")
# ?name=value or &name=value, for names that carry a credential
_OPTION = re.compile(r"(?P<pre>[?&;](?P<name>[A-Za-z_][\w.-]*)=)(?P<value>[^&;\s'\"#]*)")
_SECRET_NAME = re.compile(r"key|secret|token|session|passw|credential|signature|^sig$|^sas", re.I)

_KNOWN: dict[str, tuple[str | None, dict[str, str]]] = {}
"""(scheme://host) -> (user-info, {secret option: value}) of the URIs opened in this process."""


def _literals() -> set[str]:
    values = {os.environ.get(k, "") for k in CREDENTIAL_ENV}
    for info, options in _KNOWN.values():
        values.update(info.split(":") + [info] if info else [])
        values.update(options.values())
    values |= {unquote(v) for v in values}
    return {v for v in values if len(v) >= _MIN_LITERAL and v != MASK}


def _redact_text(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _OPTION.sub(
        lambda m: m["pre"] + (MASK if _SECRET_NAME.search(m["name"]) else m["value"]), text
    )
    for value in sorted(_literals(), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def redact(obj: Any) -> Any:
    """``obj`` with every credential masked: a text (URIs in it included), or the strings inside
    a dict / list / tuple (a record about to be saved); other values are returned as they are."""
    if isinstance(obj, str):
        return _redact_text(obj) if obj else obj
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def _split(uri: str) -> tuple[str, str | None, str, list[tuple[str, str]]]:
    """``scheme://``, the user-info (or None), ``host/path``, the query as (name, value) pairs."""
    scheme, _, rest = uri.partition("://")
    rest, _, query = rest.partition("?")
    info, at, after = rest.partition("@")
    info, rest = (info, after) if at else (None, rest)
    pairs = [tuple(p.partition("=")[::2]) for p in query.split("&") if p] if query else []
    return f"{scheme}://", info, rest, pairs  # type: ignore[return-value]


def _key(scheme: str, rest: str) -> str:
    return scheme + rest.split("/", 1)[0]


def remember(uri: str) -> None:
    """Note the credentials of ``uri`` (of its scheme and bucket / host): they are masked in every
    text from now on, and :func:`restore` puts them back into a redacted URI of the same bucket."""
    if "://" not in uri:
        return
    scheme, info, rest, pairs = _split(uri)
    secrets = {n: v for n, v in pairs if _SECRET_NAME.search(n) and v and v != MASK}
    if (info and info != MASK) or secrets:
        _KNOWN[_key(scheme, rest)] = (info if info != MASK else None, secrets)


def restore(uri: str) -> str:
    """A redacted URI made usable: each masked credential replaced by the one given for the same
    bucket on this command line (:func:`remember`), else dropped (the environment's credentials,
    or an instance profile's, are used)."""
    if "://" not in uri or MASK not in uri:
        return uri
    scheme, info, rest, pairs = _split(uri)
    known_info, known = _KNOWN.get(_key(scheme, rest), (None, {}))
    if info == MASK:
        info = known_info
    kept = [(n, known.get(n, "") if v == MASK else v) for n, v in pairs]
    query = "&".join(f"{n}={v}" for n, v in kept if v)
    return f"{scheme}{info + '@' if info else ''}{rest}{'?' + query if query else ''}"


class RedactingStream:
    """A text stream that masks credentials in everything written to it (the console: prints,
    log lines, tracebacks and the lines Ray forwards from its workers)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(redact(s))
        return len(s)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def mask_console() -> tuple[Any, Any]:
    """Mask credentials on stdout and stderr; returns the original streams (to put back)."""
    original = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
    return original


def _masking_factory(factory: Any) -> Any:
    """A log-record factory whose records carry their message masked."""

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: left for logging to report
            return record
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    make._twa_ray = True  # type: ignore[attr-defined]
    return make


def install() -> None:
    """Mask credentials in every log record of this process from now on (a log-record factory
    wrapping the current one, whoever logs and wherever the record goes); a second call does
    nothing."""
    if not getattr(logging.getLogRecordFactory(), "_twa_ray", False):
        logging.setLogRecordFactory(_masking_factory(logging.getLogRecordFactory()))
