"""Push cryptography, on ``cryptography`` primitives (no I/O).

- compact JWS/JWT with ES256 (APNs provider tokens, VAPID) and RS256 (the FCM service-account
  assertion);
- the credential envelope: AES-256-GCM under SHA-256(configured key), in the format
  ``envelope:v1:aes256gcm:`` + b64url(nonce‖ciphertext‖tag), the app and provider bound in as AAD;
- RFC 8291 Web Push message encryption (``aes128gcm``, RFC 8188 framing, one record).

The receiving side (verifying tokens, decrypting messages) is the providers' business; the tests'
fake push services have it in ``tests/support/push_crypto.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class CryptoError(ValueError):
    """Bad key material, a bad token or a payload that does not decrypt."""


# -- base64url ------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise CryptoError("expected a base64url string")
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise CryptoError("not valid base64url") from None


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# -- keys -----------------------------------------------------------------------------------


def load_ec_private_pem(pem: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise CryptoError("privateKey is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CryptoError("privateKey must be a P-256 (ES256) key")
    return key


def load_rsa_private_pem(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise CryptoError("private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CryptoError("private_key must be an RSA key (RS256)")
    return key


def p256_private_from_raw(raw_b64url: str) -> ec.EllipticCurvePrivateKey:
    """VAPID private keys are the raw 32-byte scalar, base64url."""
    raw = b64url_decode(raw_b64url)
    if len(raw) != 32:
        raise CryptoError("VAPID privateKey must be a 32-byte P-256 scalar (base64url)")
    try:
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except ValueError:
        raise CryptoError("VAPID privateKey is not a valid P-256 scalar") from None


def p256_public_raw(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The uncompressed point (65 bytes, 0x04‖X‖Y)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def p256_public_from_raw(raw: bytes) -> ec.EllipticCurvePublicKey:
    if len(raw) != 65 or raw[0] != 4:
        raise CryptoError("expected an uncompressed P-256 point (65 bytes)")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise CryptoError("not a point on P-256") from None


# -- JWT ------------------------------------------------------------------------------------


def _json_segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":"), sort_keys=False).encode())


def jwt_es256(header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    signing_input = f"{_json_segment({'alg': 'ES256', **header})}.{_json_segment(claims)}"
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def jwt_rs256(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    signing_input = f"{_json_segment({'alg': 'RS256', **header})}.{_json_segment(claims)}"
    sig = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


def vapid_authorization(
    audience: str, subject: str, key: ec.EllipticCurvePrivateKey, now: float, lifetime_s: int = 12 * 3600
) -> str:
    """``Authorization: vapid t=<JWT>, k=<public key>`` (RFC 8292)."""
    token = jwt_es256({"typ": "JWT"}, {"aud": audience, "exp": int(now) + lifetime_s, "sub": subject}, key)
    return f"vapid t={token}, k={b64url(p256_public_raw(key))}"


# -- credential envelope ---------------------------------------------------------

ENVELOPE_PREFIX = "envelope:v1:aes256gcm:"


def _envelope_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def seal(secret: str, plaintext: bytes, aad: str) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(_envelope_key(secret)).encrypt(nonce, plaintext, aad.encode())
    return ENVELOPE_PREFIX + b64url(nonce + sealed)


def unseal(secret: str, envelope: str, aad: str) -> bytes:
    if not envelope.startswith(ENVELOPE_PREFIX):
        raise CryptoError("unknown credential envelope")
    raw = b64url_decode(envelope[len(ENVELOPE_PREFIX) :])
    try:
        return AESGCM(_envelope_key(secret)).decrypt(raw[:12], raw[12:], aad.encode())
    except (InvalidTag, ValueError):
        raise CryptoError("credential does not decrypt with the configured key") from None


# -- RFC 8291 / RFC 8188 ----------------------------------------------------------------------

RECORD_SIZE = 4096


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def content_key_and_nonce(
    auth_secret: bytes, ecdh_secret: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """RFC 8291 section 3.4: IKM from the auth secret and the ECDH secret, then RFC 8188's content
    encryption key and nonce (the same derivation on the sending and the receiving side)."""
    ikm = _hkdf(auth_secret, ecdh_secret, b"WebPush: info\x00" + ua_public + as_public, 32)
    cek = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    return cek, nonce


def webpush_encrypt(
    plaintext: bytes,
    ua_public_b64: str,
    auth_b64: str,
    *,
    sender: ec.EllipticCurvePrivateKey | None = None,
    salt: bytes | None = None,
) -> bytes:
    """The ``aes128gcm`` body for one push message to a subscription (``p256dh``, ``auth``)."""
    ua_public = b64url_decode(ua_public_b64)
    auth_secret = b64url_decode(auth_b64)
    if len(auth_secret) != 16:
        raise CryptoError("auth must be 16 bytes")
    ua_key = p256_public_from_raw(ua_public)
    sender = sender or ec.generate_private_key(ec.SECP256R1())
    salt = salt or os.urandom(16)
    as_public = p256_public_raw(sender)
    ecdh_secret = sender.exchange(ec.ECDH(), ua_key)
    cek, nonce = content_key_and_nonce(auth_secret, ecdh_secret, ua_public, as_public, salt)
    record = plaintext + b"\x02"  # the last (only) record's delimiter, no padding
    ciphertext = AESGCM(cek).encrypt(nonce, record, None)
    rs = max(RECORD_SIZE, len(ciphertext))
    return salt + rs.to_bytes(4, "big") + bytes([len(as_public)]) + as_public + ciphertext
