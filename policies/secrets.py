"""What counts as a secret, and the one redaction every output goes through (logs, status, audit, errors).

A secret is either a value the config holds under a secret-looking name (`is_secret_name`: tokens, keys,
passwords, auth headers, cloud credentials), passed in as `known`, or a string with a credential's shape
(GitHub/OpenAI/Slack/AWS keys, bearer tokens, JWTs, `password=...`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any

REDACTED = "***"
MIN_SECRET_LEN = 4  # shorter known values ("1", "on") would shred unrelated text if replaced everywhere

# Names (header names, environment variables, config and log keys) whose values are credentials.
_SECRET_NAME = re.compile(
    r"(token|secret|passw|api[_-]?key|apikey|private|access[_-]?key|credential|auth|cookie|session|bearer"
    r"|^AWS_|^AZURE_|^GCP_|^GOOGLE_|^SSH_AUTH_SOCK$)",
    re.I,
)

# Credentials that have a recognisable shape, wherever they appear in free text (replaced whole).
_SECRET_SHAPES = re.compile(
    r"(AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|\b(sk|pk|rk)-[A-Za-z0-9_-]{16,}"  # OpenAI/Anthropic/Stripe-style keys
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"  # GitHub tokens
    r"|\bglpat-[A-Za-z0-9_-]{20,}|\bnpm_[A-Za-z0-9]{30,}|\bhf_[A-Za-z0-9]{30,}"  # GitLab, npm, Hugging Face
    r"|\bAIza[0-9A-Za-z_-]{30,}"  # Google API keys
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{5,}"  # JWTs
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)",  # PEM private keys
    re.DOTALL,
)
# `name=value`, `name: value`, `"name": "value"` where the name says credential: the value goes, the name
# stays (`password=***`). Names: password, passwd, secret, token, api key, access key, private key,
# credential(s), authorization -- also inside longer names (AWS_SECRET_ACCESS_KEY, client_secret), but not
# counts of tokens (`max_tokens=`, `prompt_tokens:`). In JSON only string values are replaced (inside their
# quotes), so redacted JSON stays JSON.
_NAMES = (
    r"[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|credentials?|authorization)[A-Za-z0-9_.-]*(?<!tokens)"
)
_SECRET_ASSIGNMENT = re.compile(
    rf"(?i)(?P<key>(?<![\w\"'.-]){_NAMES}\s*[=:]\s*[\"']?)"
    r"(?:(?:basic|bearer|token|digest)\s+)?(?P<value>[^\s\"',;&}]+)"
)
_JSON_SECRET = re.compile(rf'(?i)(?P<key>"{_NAMES}"\s*:\s*")(?P<value>(?:[^"\\]|\\.)+)(?=")')
# Credentials in URLs: scheme://user:password@host.
_URL_CREDENTIALS = re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)@")


def is_secret_name(name: str) -> bool:
    """True for header, environment variable and key names whose values are credentials."""
    return bool(_SECRET_NAME.search(name))


def redact(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every known secret value (pass them longest first) and every secret-shaped substring
    replaced by ***."""
    for secret in known:
        if len(secret) >= MIN_SECRET_LEN:
            text = text.replace(secret, REDACTED)
    text = _SECRET_SHAPES.sub(REDACTED, text)
    text = _JSON_SECRET.sub(_keep_key, text)
    text = _SECRET_ASSIGNMENT.sub(_keep_key, text)
    return _URL_CREDENTIALS.sub(rf"\1:{REDACTED}@", text)


def _keep_key(match: re.Match[str]) -> str:
    return match.group("key") + (REDACTED if match.group("value") != REDACTED else match.group("value"))


def redact_fields(event: MutableMapping[str, Any], known: Iterable[str] = ()) -> MutableMapping[str, Any]:
    """A mapping (a log record) with values under secret-looking keys masked and strings redacted."""
    known = tuple(known)
    for key, value in list(event.items()):
        if is_secret_name(str(key)):
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = redact(value, known)
        elif isinstance(value, list | tuple) and any(isinstance(v, str) for v in value):
            event[key] = [redact(v, known) if isinstance(v, str) else v for v in value]
    return event
