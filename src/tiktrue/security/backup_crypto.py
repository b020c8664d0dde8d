"""The encryption of a backup file: a passphrase, scrypt, AES-256-GCM (``cryptography``).

File layout::

    b"TIKTRUE-BACKUP\\n"  |  4 bytes: header length (big endian)  |  header (JSON)  |  sealed

The header says how the key was made and the nonce (``{"format": 1, "kdf": "scrypt",
"n", "r", "p", "salt", "cipher": "AES-256-GCM", "nonce"}``), nothing about the contents. The
key is scrypt(passphrase, salt) with n=2^17, r=8, p=1 (OWASP's minimum for scrypt: 128 MiB
of memory per try; 1.7 s per try measured on this project's 2-core VM while loaded, load
average 12): a stolen backup costs an attacker that much per guessed passphrase. ``sealed``
is AES-256-GCM over the archive, with the magic and the header as associated data, so neither
can be changed unseen; a wrong passphrase and a damaged file are the same failed tag. The
passphrase is normalized (Unicode NFKC: the same Persian or English text typed on another
keyboard gives the same key).
"""

from __future__ import annotations

import json
import os
import struct
import unicodedata

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"TIKTRUE-BACKUP\n"
FORMAT = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1
MAX_SCRYPT_N = 1 << 20  # what a file may ask of this PC (1 GiB): no more
MAX_HEADER_BYTES = 4096
MIN_PASSPHRASE_CHARS = 10
MAX_SEALED_BYTES = (1 << 31) - 1  # one AES-GCM call in cryptography


class BackupCryptoError(ValueError):
    """A backup that cannot be sealed or opened; the message says why, plainly."""


def _key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    text = unicodedata.normalize("NFKC", passphrase).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(text)


def check_passphrase(passphrase: str) -> None:
    if len(unicodedata.normalize("NFKC", passphrase).strip()) < MIN_PASSPHRASE_CHARS:
        raise BackupCryptoError(
            f"the passphrase needs at least {MIN_PASSPHRASE_CHARS} characters "
            "(it is all that protects the network's CA and the accounts in the file)"
        )


def seal(data: bytes, passphrase: str, *, n: int = SCRYPT_N) -> bytes:
    """The backup file's bytes for ``data`` (see the module)."""
    check_passphrase(passphrase)
    if len(data) > MAX_SEALED_BYTES:
        raise BackupCryptoError(f"the backup is too big to seal ({len(data)} bytes, 2 GiB at most)")
    salt, nonce = os.urandom(16), os.urandom(12)
    header = json.dumps(
        {
            "format": FORMAT,
            "kdf": "scrypt",
            "n": n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": salt.hex(),
            "cipher": "AES-256-GCM",
            "nonce": nonce.hex(),
        },
        sort_keys=True,
    ).encode()
    prefix = MAGIC + struct.pack(">I", len(header)) + header
    key = _key(passphrase, salt, n, SCRYPT_R, SCRYPT_P)
    return prefix + AESGCM(key).encrypt(nonce, data, prefix)


def unseal(blob: bytes, passphrase: str) -> bytes:
    """The archive in a backup file; raises ``BackupCryptoError`` (not a backup, made by a
    newer TikTrue, wrong passphrase or damaged)."""
    if not blob.startswith(MAGIC):
        raise BackupCryptoError("this is not a TikTrue backup file")
    at = len(MAGIC)
    if len(blob) < at + 4:
        raise BackupCryptoError("the backup file is cut short")
    (size,) = struct.unpack(">I", blob[at : at + 4])
    if size > MAX_HEADER_BYTES or len(blob) < at + 4 + size:
        raise BackupCryptoError("the backup file's header is damaged")
    prefix = blob[: at + 4 + size]
    try:
        header = json.loads(blob[at + 4 : at + 4 + size])
        if header["format"] != FORMAT:
            raise BackupCryptoError(
                f"this backup has format {header['format']}; this TikTrue reads format {FORMAT}"
            )
        n, r, p = int(header["n"]), int(header["r"]), int(header["p"])
        salt, nonce = bytes.fromhex(header["salt"]), bytes.fromhex(header["nonce"])
    except BackupCryptoError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupCryptoError(f"the backup file's header is damaged: {exc}") from None
    if not (header.get("kdf") == "scrypt" and header.get("cipher") == "AES-256-GCM"):
        raise BackupCryptoError("the backup file names a method this TikTrue does not use")
    if not (2 <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise BackupCryptoError("the backup file asks for scrypt settings out of range")
    if len(salt) < 16 or len(nonce) != 12:
        raise BackupCryptoError("the backup file's header is damaged")
    try:
        return AESGCM(_key(passphrase, salt, n, r, p)).decrypt(nonce, blob[len(prefix) :], prefix)
    except InvalidTag:
        raise BackupCryptoError(
            "the passphrase is wrong, or the file was changed or damaged"
        ) from None
