"""Keep secrets out of logs, artifacts, results and the Prefect database.

Secrets are found two ways: by the values of credential-like environment variables
(``ANTHROPIC_API_KEY`` and anything named like a key, token, secret or password), and by the
shapes of well-known tokens (``sk-ant-...``, GitHub tokens, ``Bearer ...``). Every string that
leaves a worker passes through :func:`redact`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

REDACTED = "[redacted]"

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
_SECRET_SHAPES = re.compile(
    r"(sk-ant-[A-Za-z0-9_\-]{8,}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}"
    r"|(?<=Bearer )[A-Za-z0-9._\-]{16,}"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@))"
)
# Values this short are too likely to occur in ordinary text to be masked safely.
_MIN_SECRET_LEN = 8


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-like variables in ``environ`` (default: this process's)."""
    env = os.environ if environ is None else environ
    values = {
        value
        for name, value in env.items()
        if _SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_LEN
    }
    # Longest first, so a secret that contains another is masked whole.
    return sorted(values, key=len, reverse=True)


def redact(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret replaced by ``[redacted]``."""
    if not text:
        return text
    for value in [*secret_values(), *(s for s in extra_secrets if len(s) >= _MIN_SECRET_LEN)]:
        if value in text:
            text = text.replace(value, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


def redact_obj(value: object) -> object:
    """A copy of a JSON-like value with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): redact_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_obj(v) for v in value]
    return value
