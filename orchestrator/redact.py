"""The one redaction step: everything mergefleet writes (plan, receipts, manifest, MLflow
records, logs, Prefect parameters and artifacts) passes through ``redact`` or
``redact_data`` so that nothing credential-shaped is stored.

Removed: the user information of a URL (``scheme://user:secret@host`` →
``scheme://***@host``), AWS access key ids (``AKIA…``, ``ASIA…``), AWS session tokens,
the value after a known secret name (``aws_secret_access_key``, ``secret``, ``token``,
``password``, …, written ``name=value`` or ``name: value``), ``Authorization`` header
values, and the literal value of every credential the environment holds
(``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, any variable named like a secret).

Recipes are refused outright when a URL in them carries user information
(``url_userinfo_key``): a secret never reaches a plan in the first place.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Iterator

MASK = "***"

_SECRET_NAMES = (
    r"aws_secret_access_key|aws_session_token|aws_security_token|secret_access_key|secret_key|session_token|"
    r"security_token|x-amz-security-token|x-amz-signature|access_token|refresh_token|client_secret|api_key|apikey|"
    r"secret|token|password|passwd|pwd"
)
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?:[^\s/\"'<>@:]*:[^\s\"'<>]*|[^\s/\"'<>]*)@"
)
"""``user@`` or ``user:password@`` after a scheme; the password may hold any character but
white space and quotes (``/``, ``@``, ``:``, ``%2F`` included): the match runs to the last ``@``."""
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA|AGPA)[A-Z0-9]{16}\b")
_AWS_SESSION_TOKEN = re.compile(r"(?:FQoGZXIvYXdz|FwoGZXIvYXdz|IQoJb3JpZ2luX2Vj)[A-Za-z0-9/+=%]+")
_NAMED_SECRET = re.compile(
    rf"(?P<name>(?<![\w-])(?:{_SECRET_NAMES}))(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',;&}}\]]+)", re.IGNORECASE
)
_AUTHORIZATION = re.compile(r"(?P<name>\bauthorization[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\"'\n]+)", re.IGNORECASE)
_SECRET_KEY = re.compile(rf"^(?:{_SECRET_NAMES}|authorization|aws_access_key_id)$", re.IGNORECASE)
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)
_MIN_ENV_SECRET = 8
"""Shorter environment values are not replaced literally (they would match ordinary words)."""


def _environment_secrets() -> list[str]:
    values = {value for name, value in os.environ.items() if _SECRET_ENV.search(name) and len(value) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact(text: str, *, environment: list[str] | None = None) -> str:
    """``text`` with everything credential-shaped replaced by ``***``. ``environment``: the
    environment's secrets, when the caller redacts many strings at once."""
    if not text:
        return text
    for secret in _environment_secrets() if environment is None else environment:
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _AWS_KEY_ID.sub(MASK, text)
    text = _AWS_SESSION_TOKEN.sub(MASK, text)
    text = _AUTHORIZATION.sub(lambda m: f"{m.group('name')}{MASK}", text)
    return _NAMED_SECRET.sub(lambda m: f"{m.group('name')}{m.group('sep')}{MASK}", text)


def redact_data(data: Any, *, environment: list[str] | None = None) -> Any:
    """A copy of JSON-like ``data`` (dicts, lists, strings) with every string redacted and
    the value of every key named like a secret replaced."""
    secrets = _environment_secrets() if environment is None else environment
    if isinstance(data, str):
        return redact(data, environment=secrets)
    if isinstance(data, dict):
        return {
            key: (
                MASK
                if isinstance(key, str) and _SECRET_KEY.match(key) and value not in (None, "")
                else redact_data(value, environment=secrets)
            )
            for key, value in data.items()
        }
    if isinstance(data, (list, tuple)):
        return type(data)(redact_data(item, environment=secrets) for item in data)
    return data


def _strings(data: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in JSON-like ``data`` with its dotted key (list items by position)."""
    if isinstance(data, str):
        yield path or "(value)", data
        return
    items: Any = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        yield from _strings(value, f"{path}.{key}" if path else str(key))


def url_userinfo_key(data: Any) -> str | None:
    """The dotted key of the first string in ``data`` holding a URL with user information
    (``scheme://user:secret@host``), whatever characters the secret has; else ``None``."""
    return next((key for key, text in _strings(data) if _URL_USERINFO.search(text)), None)


def redacted_keys(data: Any) -> list[str]:
    """The dotted keys of the strings in ``data`` that ``redact`` would change."""
    secrets = _environment_secrets()
    return [key for key, text in _strings(data) if redact(text, environment=secrets) != text]


def _redacting_factory(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: left for the handler to report
            return record
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    return factory


def install_log_redaction() -> None:
    """Redact every log record of this process as it is made, whichever logger or handler
    (a file, Prefect's API handler, the terminal) it goes to. Calling it again does nothing."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "redacting", False):
        logging.setLogRecordFactory(_redacting_factory(current))
