"""Where OAuth tokens live between runs: one JSON record per server, in a 0600 file (or the OS keyring).

A record is bound to the canonical resource URL it was issued for; a record for another resource (the
server's URL changed) reads as empty, so a token never reaches a server it was not issued for.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import ValidationError

from transports.errors import TransportError

KEYRING_SERVICE = "agent-runtime"


class TokenStoreError(TransportError):
    """The token store could not be read or written (permissions, a corrupt file, no keyring)."""


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """What `status` shows of a record: never the tokens themselves."""

    resource: str
    has_access_token: bool
    has_refresh_token: bool
    expires_at: float | None
    scope: str | None
    client_id: str | None

    def state(self, now: float | None = None) -> str:
        """none, valid, expired (refreshable) or expired."""
        if not self.has_access_token:
            return "none"
        if self.expires_at is None or (now if now is not None else time.time()) < self.expires_at:
            return "valid"
        return "expired (refreshable)" if self.has_refresh_token else "expired"


class _Backend(Protocol):
    def load(self) -> dict[str, Any] | None: ...

    def save(self, record: dict[str, Any]) -> None: ...

    def delete(self) -> bool: ...


class _FileBackend:
    """One JSON file, 0600 in a 0700 directory, replaced atomically (a crash never leaves half a record)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(f"cannot read token file {self.path}: {exc.strerror}") from None
        try:
            record = json.loads(text)
        except ValueError:
            raise TokenStoreError(
                f"token file {self.path} is corrupt", "run `agent-runtime auth logout` for this server"
            ) from None
        return record if isinstance(record, dict) else None

    def save(self, record: dict[str, Any]) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokens-", suffix=".tmp")  # created 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(record, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise TokenStoreError(f"cannot write token file {self.path}: {exc.strerror}") from None

    def delete(self) -> bool:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise TokenStoreError(f"cannot delete token file {self.path}: {exc.strerror}") from None
        return True


class _KeyringBackend:
    """The OS keyring (opt-in: `"store": "keyring"`), through the optional `keyring` package."""

    def __init__(self, key: str) -> None:
        try:
            # An optional dependency, only for a config that asks for the keyring (not installed by default).
            keyring = importlib.import_module("keyring")
        except ImportError:
            raise TokenStoreError(
                "token store 'keyring' needs the keyring package",
                "pip install keyring, or use the file store",
            ) from None
        self._keyring: Any = keyring
        self._key = key

    def load(self) -> dict[str, Any] | None:
        try:
            text = self._keyring.get_password(KEYRING_SERVICE, self._key)
        except Exception as exc:  # keyring backends raise their own error types
            raise TokenStoreError(f"cannot read the keyring: {type(exc).__name__}") from None
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def save(self, record: dict[str, Any]) -> None:
        try:
            self._keyring.set_password(KEYRING_SERVICE, self._key, json.dumps(record))
        except Exception as exc:  # keyring backends raise their own error types
            raise TokenStoreError(f"cannot write the keyring: {type(exc).__name__}") from None

    def delete(self) -> bool:
        try:
            if self._keyring.get_password(KEYRING_SERVICE, self._key) is None:
                return False
            self._keyring.delete_password(KEYRING_SERVICE, self._key)
        except Exception as exc:  # keyring backends raise their own error types
            raise TokenStoreError(f"cannot delete from the keyring: {type(exc).__name__}") from None
        return True


class TokenStore:
    """The SDK's `TokenStorage` for one server, bound to its canonical resource URL.

    Records the absolute expiry next to the tokens (the SDK keeps it only in memory), so a token loaded
    by a later run is refreshed when it has expired instead of being sent stale.
    """

    def __init__(self, backend: _Backend, resource: str) -> None:
        self._backend = backend
        self.resource = resource

    @classmethod
    def file(cls, path: Path, resource: str) -> TokenStore:
        return cls(_FileBackend(path), resource)

    @classmethod
    def keyring(cls, key: str, resource: str) -> TokenStore:
        return cls(_KeyringBackend(key), resource)

    @property
    def path(self) -> Path | None:
        return self._backend.path if isinstance(self._backend, _FileBackend) else None

    def record(self) -> dict[str, Any]:
        """The raw record for this resource ({} when none or issued for another resource)."""
        record = self._backend.load()
        if record is None or record.get("resource") != self.resource:
            return {}  # nothing, or a record issued for another resource: never used here
        return record

    async def update(self, **fields: Any) -> None:
        """Merge `fields` into the record (read, change, atomic replace)."""

        def write() -> None:
            record = self.record()
            record.update(fields, resource=self.resource)
            self._backend.save(record)

        await anyio.to_thread.run_sync(write)

    # -- the SDK's TokenStorage protocol

    async def get_tokens(self) -> OAuthToken | None:
        raw = (await anyio.to_thread.run_sync(self.record)).get("tokens")
        try:
            return OAuthToken.model_validate(raw) if raw else None
        except ValidationError:
            return None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        expires_at = time.time() + tokens.expires_in if tokens.expires_in is not None else None
        await self.update(tokens=tokens.model_dump(mode="json", exclude_none=True), expires_at=expires_at)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        raw = (await anyio.to_thread.run_sync(self.record)).get("client")
        try:
            return OAuthClientInformationFull.model_validate(raw) if raw else None
        except ValidationError:
            return None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        await self.update(client=client_info.model_dump(mode="json", exclude_none=True))

    # -- ours

    async def expires_at(self) -> float | None:
        value = (await anyio.to_thread.run_sync(self.record)).get("expires_at")
        return float(value) if isinstance(value, int | float) else None

    async def clear_tokens(self, *, keep_client: bool = True) -> None:
        def write() -> None:
            record = self.record()
            client = record.get("client") if keep_client else None
            if client is None:
                self._backend.delete()
            else:
                self._backend.save({"resource": self.resource, "client": client})

        await anyio.to_thread.run_sync(write)

    def delete(self) -> bool:
        """Forget everything stored for this server (tokens and registration); True when there was a record."""
        return self._backend.delete()

    def grant(self) -> StoredGrant | None:
        """The record's shape for `auth status`, or None when nothing usable is stored."""
        record = self.record()
        tokens = record.get("tokens") if isinstance(record.get("tokens"), dict) else None
        if not record:
            return None
        client = record.get("client") if isinstance(record.get("client"), dict) else {}
        expires = record.get("expires_at")
        return StoredGrant(
            resource=self.resource,
            has_access_token=bool(tokens and tokens.get("access_token")),
            has_refresh_token=bool(tokens and tokens.get("refresh_token")),
            expires_at=float(expires) if isinstance(expires, int | float) else None,
            scope=tokens.get("scope") if tokens else None,
            client_id=client.get("client_id") if client else None,
        )
