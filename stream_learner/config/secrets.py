"""Masking secrets: setting values and any text (URLs with credentials) as they may be shown.

Nothing here knows the settings struct, so the struct can use it to redact itself.
"""

from __future__ import annotations

import re
from typing import Any


def is_secret(field: str) -> bool:
    """True if setting ``field``'s whole value is a secret (a password setting).

    >>> is_secret("redis_password"), is_secret("redis_url")
    (True, False)
    """
    return "password" in field


# scheme://userinfo@ ; greedy up to the last "@" before the path, so a password holding an "@" is masked whole.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|secret)=)[^&#\s]*")


def _mask_userinfo(m: re.Match[str]) -> str:
    user, colon, _ = m.group("userinfo").partition(":")
    # "user:password@" keeps the user; a lone "token@" may be the secret itself.
    return f"{m.group('scheme')}{user}:***@" if colon else f"{m.group('scheme')}***@"


def mask_secrets(text: str) -> str:
    """``text`` with the credentials inside URLs masked (``user:password@`` and ``?password=``).

    >>> mask_secrets("redis://:hunter2@cache:6379/0, rediss://app:p@ss@cache/1")
    'redis://:***@cache:6379/0, rediss://app:***@cache/1'
    >>> mask_secrets("redis://token@cache:6379?password=x&db=1")
    'redis://***@cache:6379?password=***&db=1'
    >>> mask_secrets("kafka-1:9092,kafka-2:9092")
    'kafka-1:9092,kafka-2:9092'
    """
    if "@" not in text and "=" not in text:
        return text  # the common case, and logs are hot
    return _QUERY_SECRET.sub(r"\g<key>***", _URL_USERINFO.sub(_mask_userinfo, text))


def redact(field: str, value: Any) -> Any:
    """A setting's value as it may be shown: secrets masked (see :func:`mask_secrets`).

    >>> redact("redis_password", "hunter2"), redact("redis_url", "redis://:hunter2@h:6379/0")
    ('***', 'redis://:***@h:6379/0')
    """
    if is_secret(field) and value:
        return "***"
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, list):
        return [mask_secrets(v) if isinstance(v, str) else v for v in value]
    return value
