"""Identifiers in OpenAI's style: chatcmpl-…, cmpl-…, org-…, key-…"""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24, sep: str = "-") -> str:
    """One read of the system's randomness per id (secrets.choice made one per character, a
    visible cost on every request), written in base 62."""
    n = int.from_bytes(secrets.token_bytes(length))  # 8 bits per 5.95 digits: enough entropy
    digits = []
    for _ in range(length):
        n, d = divmod(n, 62)
        digits.append(_ALPHABET[d])
    return f"{prefix}{sep}" + "".join(digits)
