"""Reasoning that survives ``store: false``: a reasoning item's text sealed for its tenant.

With ``include: ["reasoning.encrypted_content"]`` each reasoning item carries its text as
``encrypted_content``: AES-256-GCM (``cryptography``'s AESGCM: authenticated, so a blob that was
changed, cut short or made under another key fails to open, never decrypts to garbage) under a
key derived (HKDF-SHA256) from the server's secret. The tenant is the associated data, so one
API key's blob does not open under another. A client that keeps nothing on the server sends the
items back, and the text goes back into the Harmony prompt.

The secret is ``--reasoning-key`` / ``GPTOSS_REASONING_KEY`` (replicas must share one); without
it, a secret generated once and kept in a file beside the response store, readable by its owner
only; with an in-memory store, one that lives as long as the process.

Blob: urlsafe base64 of ``version (1 byte) | nonce (12) | ciphertext and tag``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_INFO = b"gptoss-hf-server reasoning seal v1"
ASSOCIATED = b"gptoss-hf-server/reasoning/v1\x00"
KEY_FILE = "reasoning.key"


class SealBroken(ValueError):
    """A blob that this server did not seal for this tenant, or that was changed or cut short."""


class ReasoningSeal:
    def __init__(self, secret: bytes) -> None:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO).derive(secret)
        self._aead = AESGCM(derived)

    @classmethod
    def ephemeral(cls) -> ReasoningSeal:
        """A key for this process alone (nothing stored: its blobs die with it)."""
        return cls(secrets.token_bytes(32))

    @staticmethod
    def _associated(tenant: str | None) -> bytes:
        return ASSOCIATED + (tenant or "").encode()

    def seal(self, text: str, tenant: str | None) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, text.encode(), self._associated(tenant))
        return base64.urlsafe_b64encode(bytes([VERSION]) + nonce + sealed).decode("ascii")

    def open(self, blob: str, tenant: str | None) -> str:
        """The text sealed in ``blob`` for ``tenant``; SealBroken for anything else."""
        try:
            raw = base64.urlsafe_b64decode(blob.encode("ascii"))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise SealBroken("not a sealed blob") from None
        if len(raw) < 1 + NONCE_BYTES + TAG_BYTES or raw[0] != VERSION:
            raise SealBroken("not a sealed blob")
        nonce, sealed = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
        try:
            text = self._aead.decrypt(nonce, sealed, self._associated(tenant))
        except InvalidTag:
            raise SealBroken("the blob does not open under this server's key for this caller") from None
        return text.decode()


def kept_secret(folder: Path) -> bytes:
    """The secret in ``folder``/reasoning.key, made on first use (mode 0600). Written under a
    temporary name and linked into place, so a second server starting at the same moment reads
    the whole of the first one's secret, never half of it. OSError for a file others can read."""
    path = folder / KEY_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii") + "\n")
            with contextlib.suppress(FileExistsError):  # another server made it first: theirs is kept
                os.link(temporary, path)
        finally:
            temporary.unlink()
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise OSError(f"{path} may be read by others (mode {stat.filemode(mode)}): chmod 600 it")
    return path.read_text().strip().encode()
