"""API keys for ``pj serve``: each key belongs to one user id, or is an admin key.

- A user's key personalises only as that user (a request's ``user`` must be absent or the
  key's own; absent means the key's user), and reads and writes only that user's profile.
- An admin key may do everything: any ``user``, every profile, ``GET /v1/profiles``.
- No key, or a key the server does not know: 401. A valid key asking for another user's
  data: 403.

Keys come from a key file (``pj keys add`` writes it; it holds only SHA-256 hashes of the keys,
so a leaked file gives no key away) and from the ``PJ_API_KEYS`` environment variable
(``user_id=key`` pairs separated by commas, ``*=key`` for an admin key), hashed when read. Keys
are random 256-bit strings, so a plain SHA-256 is enough: there is nothing to brute-force.

With no key at all the server runs open (every request is allowed), which ``pj serve`` allows
on a loopback address only.

Example:
    >>> ring = KeyRing.from_env({"PJ_API_KEYS": "alice=pj-alice-secret-1,*=pj-admin-secret-1"})
    >>> ring.authenticate("Bearer pj-alice-secret-1").user_id
    'alice'
    >>> ring.authenticate("Bearer pj-admin-secret-1").admin
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pj_core.errors import ApiKeyFileError, AuthenticationError, PermissionDeniedError
from pj_core.personas import check_user_id

KEYS_ENV_VAR = "PJ_API_KEYS"
"""``user_id=key`` pairs, comma-separated; ``*=key`` is an admin key."""

KEYS_FILE_ENV_VAR = "PJ_API_KEYS_FILE"
"""The key file ``pj serve`` and ``pj keys`` use when no ``--api-keys`` / ``--file`` is given."""

KEY_FILE_FORMAT = "persona-judge-api-keys"
KEY_PREFIX = "pj-"
ADMIN = "*"


def hash_key(key: str) -> str:
    """The SHA-256 of a key, as hex (what a key file stores).

    Example:
        >>> hash_key("pj-x")[:12]
        'a3c14391f6fd'
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key: ``pj-`` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyEntry:
    """One key as stored: its hash, whose it is, and an id to name it by (not secret).

    Attributes:
        key_id: ``key_<8 hex>``, for ``pj keys list`` / ``revoke``.
        sha256: the key's hash.
        user_id: the user it acts as, or ``None`` for an admin key.
        created_at: ISO time it was added (informational).
    """

    key_id: str
    sha256: str
    user_id: str | None
    created_at: str = ""

    @property
    def admin(self) -> bool:
        return self.user_id is None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "sha256": self.sha256,
            "user_id": self.user_id,
            "admin": self.admin,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Principal:
    """Who a request acts as.

    Attributes:
        user_id: the key's user (``None`` for an admin key or an open server).
        admin: may act as anyone.
        key_id: the key's id (``"open"`` when the server has no keys).
    """

    user_id: str | None
    admin: bool
    key_id: str

    def personalise_as(self, options: dict[str, Any]) -> dict[str, Any]:
        """A chat request's options as this principal may send them: a user's key fills in
        ``user_id`` (unless the request brings its own preferences) and may not name another.

        Raises:
            PermissionDeniedError: a user's key naming another user.
        """
        if self.admin:
            return options
        requested = options.get("user_id")
        if requested is not None and requested != self.user_id:
            raise PermissionDeniedError(
                f"this API key belongs to user {self.user_id!r} and cannot personalise as "
                f"{requested!r}; leave 'user' out or send {self.user_id!r}"
            )
        if requested is None and "preferences" not in options:
            return {**options, "user_id": self.user_id}
        return options

    def check_profile(self, user_id: str) -> None:
        """Refuse access to another user's profile.

        Raises:
            PermissionDeniedError: a user's key and another user's profile.
        """
        if not self.admin and user_id != self.user_id:
            raise PermissionDeniedError(
                f"this API key belongs to user {self.user_id!r}; it reads and writes only "
                f"/v1/profiles/{self.user_id} (an admin key manages every profile)"
            )

    def check_admin(self, what: str) -> None:
        """Refuse an admin-only operation to a user's key.

        Raises:
            PermissionDeniedError: not an admin key.
        """
        if not self.admin:
            raise PermissionDeniedError(f"{what} needs an admin key (`pj keys add --admin`)")


OPEN = Principal(user_id=None, admin=True, key_id="open")
"""The principal of every request to a server with no keys."""


class KeyRing:
    """The keys a server accepts, looked up by hash.

    Example:
        >>> ring = KeyRing([KeyEntry("key_1", hash_key("pj-a"), "alice")])
        >>> ring.authenticate("Bearer pj-b")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        pj_core.errors.AuthenticationError: the API key is not valid ...
    """

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        self.entries = list(entries)
        self._by_hash = {entry.sha256: entry for entry in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __add__(self, other: KeyRing) -> KeyRing:
        return KeyRing([*self.entries, *other.entries])

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header (``Bearer <key>``); everyone is
        :data:`OPEN` when the ring is empty.

        Raises:
            AuthenticationError: no header, not a bearer token, or an unknown key.
        """
        if not self.entries:
            return OPEN
        if not authorization:
            raise AuthenticationError(
                "no API key: send 'Authorization: Bearer <key>' (OpenAI clients: api_key=...)"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("send the API key as 'Authorization: Bearer <key>'")
        entry = self._by_hash.get(hash_key(key.strip()))
        if entry is None:
            raise AuthenticationError("the API key is not valid; ask the server's admin for one")
        return Principal(user_id=entry.user_id, admin=entry.admin, key_id=entry.key_id)

    # ----- sources

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KeyRing:
        """Keys from ``PJ_API_KEYS`` (``alice=key1,bob=key2,*=admin-key``).

        Raises:
            ApiKeyFileError: a malformed pair, an invalid user id, or a key shorter than
                16 characters.
        """
        value = (os.environ if environ is None else environ).get(KEYS_ENV_VAR, "")
        entries = []
        for index, pair in enumerate(p.strip() for p in value.split(",") if p.strip()):
            user_id, sep, key = (part.strip() for part in pair.partition("="))
            if not sep or not user_id or not key:
                raise ApiKeyFileError(
                    f"{KEYS_ENV_VAR} entry {index + 1} is not 'user_id=key' (use '*=key' for "
                    "an admin key)"
                )
            if len(key) < 16:
                raise ApiKeyFileError(
                    f"{KEYS_ENV_VAR} entry {index + 1} has a key of {len(key)} characters; use "
                    "at least 16 random characters (`pj keys add` makes 46)"
                )
            owner = None if user_id == ADMIN else _checked_user(user_id, KEYS_ENV_VAR)
            entries.append(KeyEntry(f"env_{index + 1}", hash_key(key), owner))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Keys from a key file written by :func:`add_key` (``pj keys add``).

        Raises:
            ApiKeyFileError: the file is missing, unreadable or not a key file.
        """
        return cls(read_key_file(path, must_exist=True))


def _checked_user(user_id: str, where: str) -> str:
    try:
        return check_user_id(user_id)
    except ValueError as exc:
        raise ApiKeyFileError(f"{where}: {exc}") from None


def read_key_file(path: str | os.PathLike[str], *, must_exist: bool = False) -> list[KeyEntry]:
    """The entries of a key file (``[]`` for a missing file unless ``must_exist``).

    Raises:
        ApiKeyFileError: unreadable, not JSON, not a key file, or a malformed entry.
    """
    target = Path(path).expanduser()
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        if must_exist:
            raise ApiKeyFileError(
                f"there is no API key file at {target}; create keys with `pj keys add USER_ID "
                f"--file {target}`"
            ) from None
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(f"cannot read the API key file {target}: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiKeyFileError(
            f"{target} is not JSON ({exc}); it must be a file `pj keys` wrote"
        ) from None
    if (
        not isinstance(document, dict)
        or document.get("format") != KEY_FILE_FORMAT
        or not isinstance(document.get("keys", []), list)
    ):
        raise ApiKeyFileError(f"{target} is not an API key file written by `pj keys add`")
    entries = []
    for index, item in enumerate(document.get("keys", [])):
        try:
            user_id = item["user_id"]
            entry = KeyEntry(
                key_id=str(item["id"]),
                sha256=str(item["sha256"]),
                user_id=None if user_id is None else _checked_user(str(user_id), str(target)),
                created_at=str(item.get("created_at", "")),
            )
        except (KeyError, TypeError):
            raise ApiKeyFileError(
                f"{target}: key {index} lacks 'id', 'sha256' or 'user_id'"
            ) from None
        if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
            raise ApiKeyFileError(f"{target}: key {entry.key_id} has no SHA-256 hex digest")
        entries.append(entry)
    return entries


def write_key_file(path: str | os.PathLike[str], entries: Iterable[KeyEntry]) -> None:
    """Write a key file atomically, readable by its owner only (mode 0600)."""
    target = Path(path).expanduser()
    document = {"format": KEY_FILE_FORMAT, "keys": [e.as_json() for e in entries]}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise ApiKeyFileError(f"cannot write the API key file {target}: {exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.chmod(temp, 0o600)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def add_key(path: str | os.PathLike[str], user_id: str | None) -> tuple[str, KeyEntry]:
    """Make a key for ``user_id`` (``None``: an admin key), store its hash in the key file
    at ``path`` (created if missing) and return the key, which is not stored anywhere.

    Raises:
        ApiKeyFileError: an invalid user id, or an unreadable or unwritable file.
    """
    owner = None if user_id is None else _checked_user(user_id, "user id")
    entries = read_key_file(path)
    key = new_key()
    entry = KeyEntry(
        key_id=f"key_{secrets.token_hex(4)}",
        sha256=hash_key(key),
        user_id=owner,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_key_file(path, [*entries, entry])
    return key, entry


def revoke_key(path: str | os.PathLike[str], key_id: str) -> KeyEntry:
    """Remove the key ``key_id`` from the key file; returns its entry.

    Raises:
        ApiKeyFileError: no such key id, or an unreadable or unwritable file.
    """
    entries = read_key_file(path, must_exist=True)
    kept = [e for e in entries if e.key_id != key_id]
    if len(kept) == len(entries):
        ids = ", ".join(e.key_id for e in entries) or "none"
        raise ApiKeyFileError(f"no key {key_id!r} in {path} (the keys: {ids})")
    write_key_file(path, kept)
    return next(e for e in entries if e.key_id == key_id)
