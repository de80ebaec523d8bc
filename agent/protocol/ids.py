r"""
Identifier patterns: thing names, service ids, tokens and regions, one definition each.

Every pattern is ASCII only (``re.ASCII`` and explicit classes, never ``\\d`` or
``\\w`` on their Unicode meaning): these values become topic names, command-line
map entries, host names and HTTP headers, where a look-alike character is an
injection. Match them with ``fullmatch``.
"""

from __future__ import annotations

import hashlib
import re


__all__ = [
    "ACCESS_TOKEN",
    "API_SERVICE",
    "CLIENT_TOKEN",
    "MAX_TOKEN_LENGTH",
    "REGION",
    "SERVICE_ID",
    "THING_NAME",
    "token_digest",
]

#: An AWS IoT thing name (CreateThing, the tunnel's destinationConfig.thingName).
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}", re.ASCII)

#: A service as the Secure Tunneling API accepts it in destinationConfig.services.
API_SERVICE = re.compile(r"[a-zA-Z0-9:_-]{1,128}", re.ASCII)

#: A service id in a local proxy's map (``-d SSH=22``): the API's shape without ':',
#: which the map syntax cannot carry (docs/protocol.md §8).
SERVICE_ID = re.compile(r"[a-zA-Z0-9_-]{1,128}", re.ASCII)

#: A client token, the localproxy's rule: it lets a proxy reconnect with a spent token.
CLIENT_TOKEN = re.compile(r"[a-zA-Z0-9-]{32,128}", re.ASCII)

#: An AWS region: us-east-1, us-gov-west-1, us-isob-east-1, eusc-de-east-1. It goes
#: into the data-plane host name, so nothing but letters, digits and hyphens.
REGION = re.compile(r"[a-z]{2,4}(-[a-z]+){1,2}-[0-9]{1,2}", re.ASCII)

#: The localproxy refuses longer access tokens.
MAX_TOKEN_LENGTH = 4096

#: Access-token characters: URL-safe base64, plus '+', '/' and '=' of standard base64.
ACCESS_TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]+", re.ASCII)


def token_digest(token: str) -> str:
    """
    Return the SHA-256 of a token, by which it can be recognised without being kept.
    """
    return hashlib.sha256(token.encode()).hexdigest()
