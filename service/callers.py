"""Callers: API keys (hashed at rest), the routes each may use, its quotas, and reloading them.

The keys file (`keys_file`, TOML or JSON by its suffix) holds no key, only a keyed hash of each:
HMAC-SHA256 under the file's `salt`, so a copy of the file is no list of keys, and a leaked hash
cannot be tried against other deployments. A presented key is hashed the same way, looked up by
its hash and compared with `hmac.compare_digest`; a caller never learns more than "not a key".

    salt = "8c1f…"                       # hex, 16 bytes or more (python -m service.callers salt)
    [keys.team-search]                   # the key's id: stable, names its quotas and streams
    name = "Search team"                 # optional: the label in metrics and logs (default: the id)
    hashes = ["hmac-sha256:…"]           # one or more (two while a key is rotated)
    routes = ["sim", "claude"]           # the routes it may use; ["*"] for all
    max_concurrent_streams = 10          # quotas; 0 or absent: no limit
    requests_per_minute = 600
    tokens_per_minute = 200000

A key comes off the file (revoked) or onto it (rotated) without a restart: the file is read again
when its mtime changes, or on SIGHUP. Streams in flight keep the caller they started with. A file
that no longer parses is refused with an ERROR line and the keys loaded before stay in force.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ErrorCode, GatewayError

log = logging.getLogger("tokenwire.callers")

HASH_SCHEME = "hmac-sha256:"
KEY_PREFIX = "sk-tw-"
# Longer than any key this module makes; a longer header is no key and is not hashed.
_MAX_KEY_CHARS = 512
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_QUOTAS = ("max_concurrent_streams", "requests_per_minute", "tokens_per_minute")
_FIELDS = frozenset({"name", "hash", "hashes", "routes", *_QUOTAS})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling. `id` is stable (quotas, stream ownership); `name` is for people and labels."""

    id: str
    name: str
    # None: every route.
    routes: frozenset[str] | None = None
    max_concurrent_streams: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.max_concurrent_streams or self.requests_per_minute or self.tokens_per_minute)

    def may_use(self, route: str) -> bool:
        return self.routes is None or route in self.routes


# The caller of a server without keys: every route, no quotas, owns its streams as before.
ANONYMOUS = Caller(id="", name="")


def unauthenticated(message: str = "a valid API key is required: authorization: Bearer <key>") -> GatewayError:
    return GatewayError(ErrorCode.UNAUTHENTICATED, message)


def permission_denied(route: str) -> GatewayError:
    return GatewayError(ErrorCode.PERMISSION_DENIED, f"this API key may not use route {route[:128]!r}")


def hash_key(salt: bytes, key: str) -> str:
    return HASH_SCHEME + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()


class KeysError(ValueError):
    """The keys file cannot be used; the message names the file and the problem, never a hash."""


@dataclass(frozen=True, slots=True)
class KeySet:
    salt: bytes
    by_digest: Mapping[bytes, tuple[bytes, Caller]]


def parse_keys(data: Mapping[str, Any], where: str) -> KeySet:
    salt_hex = data.get("salt")
    if not isinstance(salt_hex, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,}", salt_hex):
        raise KeysError(f"{where}: salt must be hex of 16 bytes or more (python -m service.callers salt)")
    tables = data.get("keys", {})
    unknown = set(data) - {"salt", "keys"}
    if unknown or not isinstance(tables, dict):
        raise KeysError(f"{where}: a keys file has `salt` and [keys.ID] tables only")
    by_digest: dict[bytes, tuple[bytes, Caller]] = {}
    for key_id, spec in tables.items():
        if not _ID.fullmatch(key_id):
            raise KeysError(f"{where}: key id {key_id[:64]!r} must be 1-64 of letters, digits and ._-")
        if not isinstance(spec, dict) or set(spec) - _FIELDS:
            raise KeysError(f"{where}: [keys.{key_id}] takes only {sorted(_FIELDS)}")
        hashes = spec.get("hashes", [spec["hash"]] if "hash" in spec else [])
        if not hashes or not isinstance(hashes, list):
            raise KeysError(f"{where}: [keys.{key_id}] needs `hash` or `hashes`")
        routes = spec.get("routes", [])
        if not isinstance(routes, list) or not routes or not all(isinstance(r, str) for r in routes):
            raise KeysError(f'{where}: [keys.{key_id}] routes must be a list of route names, or ["*"]')
        name = spec.get("name", key_id)
        if not isinstance(name, str) or not _ID.fullmatch(name.replace(" ", "-")):
            raise KeysError(f"{where}: [keys.{key_id}] name must be 1-64 of letters, digits, spaces and ._-")
        quotas: dict[str, int] = {}
        for quota in _QUOTAS:
            value = spec.get(quota, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
                raise KeysError(f"{where}: [keys.{key_id}] {quota} must be a whole number >= 0")
            quotas[quota] = value
        caller = Caller(id=key_id, name=name, routes=None if "*" in routes else frozenset(routes), **quotas)
        for value in hashes:
            if not isinstance(value, str) or not re.fullmatch(HASH_SCHEME + "[0-9a-f]{64}", value):
                # The value is not quoted: it may be a key pasted where its hash belongs.
                raise KeysError(f"{where}: [keys.{key_id}] a hash must be {HASH_SCHEME}<64 hex digits>")
            digest = bytes.fromhex(value.removeprefix(HASH_SCHEME))
            if digest in by_digest:
                raise KeysError(f"{where}: [keys.{key_id}] repeats a hash of [keys.{by_digest[digest][1].id}]")
            by_digest[digest] = (digest, caller)
    return KeySet(bytes.fromhex(salt_hex), by_digest)


def read_keys(path: Path) -> KeySet:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeysError(f"{path}: cannot be read ({type(exc).__name__})") from None
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        # The parser's message may quote the line, which may hold a hash: say only where.
        raise KeysError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}") from None
    if not isinstance(data, dict):
        raise KeysError(f"{path}: not a table")
    return parse_keys(data, str(path))


class KeyRing:
    """The keys in force. `authenticate` is a dict lookup and one constant-time compare."""

    def __init__(self, path: Path | None, reload_seconds: float = 0.0) -> None:
        self.path = path
        self.reload_seconds = reload_seconds
        self._keys = read_keys(path) if path is not None else None
        self._mtime = self._stat()
        self._watcher: asyncio.Task[None] | None = None
        self.reloads = 0

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    def __len__(self) -> int:
        return len({c.id for _, c in self._keys.by_digest.values()}) if self._keys is not None else 0

    def authenticate(self, values: Sequence[str]) -> Caller:
        """The caller whose key the `authorization` value(s) carry; UNAUTHENTICATED otherwise."""
        keys = self._keys
        if keys is None:
            return ANONYMOUS
        if not values:
            raise unauthenticated()
        if len(values) > 1:
            # Two credentials are one too many: which one counts is not ours to guess.
            raise unauthenticated("send one authorization header, not several")
        scheme, _, key = values[0].strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > _MAX_KEY_CHARS:
            raise unauthenticated("authorization must be `Bearer <key>`")
        digest = hmac.new(keys.salt, key.encode(), hashlib.sha256).digest()
        # The lookup is by a keyed hash no caller can steer; the stored hash is then compared in
        # constant time, so neither step says how close a guess came.
        found = keys.by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise unauthenticated("this API key is not valid (unknown or revoked)")
        return found[1]

    def routes_of(self, caller: Caller, names: Sequence[str]) -> list[str]:
        return [name for name in names if caller.may_use(name)]

    def reload(self) -> bool:
        """Reads the file again; True when the new keys are in force. Streams in flight go on."""
        if self.path is None:
            return False
        self._mtime = self._stat()
        try:
            keys = read_keys(self.path)
        except KeysError as exc:
            log.error("keys file not reloaded, the keys loaded before stay in force: %s", exc)
            return False
        self._keys = keys
        self.reloads += 1
        log.info("keys file reloaded: %d key(s) in force", len(self))
        return True

    def start(self) -> None:
        if self.path is not None and self.reload_seconds > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="keys file watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_seconds)
            if self._stat() != self._mtime:
                self.reload()


def main(argv: list[str] | None = None) -> int:
    """`python -m service.callers salt | new-key | hash`: what an operator needs to write a keys file."""
    parser = argparse.ArgumentParser(prog="python -m service.callers", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("salt", help="print a new salt for a keys file")
    sub.add_parser("new-key", help="print a new API key (give it to the caller; store only its hash)")
    hasher = sub.add_parser("hash", help="print the hash of a key read from stdin, for the keys file")
    hasher.add_argument("--salt", required=True, help="the keys file's salt (hex)")
    args = parser.parse_args(argv)
    if args.command == "salt":
        print(secrets.token_hex(16))
    elif args.command == "new-key":
        print(KEY_PREFIX + secrets.token_urlsafe(32))
    else:
        key = sys.stdin.readline().strip()
        if not key:
            parser.error("no key on stdin")
        print(hash_key(bytes.fromhex(args.salt), key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
