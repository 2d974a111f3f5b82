"""The receiving side of push cryptography, as APNs, FCM and Web Push services and user agents do
it: verify a JWT (ES256, RS256), read a VAPID header, decrypt an RFC 8291 ``aes128gcm`` body.
The server only signs and encrypts (``sockudo.push.crypto``)."""

from __future__ import annotations

import json
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sockudo.push.crypto import (
    CryptoError,
    b64url_decode,
    content_key_and_nonce,
    p256_public_from_raw,
    p256_public_raw,
)

_HEADER_LEN = 16 + 4 + 1 + 65


def p256_raw_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def jwt_decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = token.split(".")
    if len(parts) != 3:
        raise CryptoError("not a compact JWS")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise CryptoError("JWT segments are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise CryptoError("JWT segments are not objects")
    return header, claims


def jwt_verify(token: str, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify the signature (ES256 for EC keys, RS256 for RSA keys); returns (header, claims)."""
    header, claims = jwt_decode_unverified(token)
    signing_input, _, sig_text = token.rpartition(".")
    sig = b64url_decode(sig_text)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if header.get("alg") != "ES256" or len(sig) != 64:
                raise CryptoError("expected an ES256 signature")
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            key.verify(der, signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        else:
            if header.get("alg") != "RS256":
                raise CryptoError("expected an RS256 signature")
            key.verify(sig, signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise CryptoError("bad JWT signature") from None
    return header, claims


def parse_vapid_authorization(value: str) -> tuple[str, str]:
    """``vapid t=…, k=…`` → (token, public key b64url)."""
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "vapid":
        raise CryptoError("not a vapid authorization")
    params: dict[str, str] = {}
    for part in rest.split(","):
        name, _, val = part.strip().partition("=")
        params[name.strip().lower()] = val.strip()
    if "t" not in params or "k" not in params:
        raise CryptoError("vapid authorization needs t= and k=")
    return params["t"], params["k"]


def webpush_decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth_b64: str) -> bytes:
    """What a user agent does with an ``aes128gcm`` body (single record)."""
    if len(body) < _HEADER_LEN + 17:
        raise CryptoError("body too short for aes128gcm")
    salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    keyid = body[21 : 21 + idlen]
    ciphertext = body[21 + idlen :]
    if len(ciphertext) > rs:
        raise CryptoError("more than one record")
    as_key = p256_public_from_raw(keyid)
    ecdh_secret = ua_private.exchange(ec.ECDH(), as_key)
    cek, nonce = content_key_and_nonce(b64url_decode(auth_b64), ecdh_secret, p256_public_raw(ua_private), keyid, salt)
    try:
        record = AESGCM(cek).decrypt(nonce, ciphertext, None)
    except InvalidTag:
        raise CryptoError("aes128gcm record does not decrypt") from None
    stripped = record.rstrip(b"\x00")
    if not stripped.endswith(b"\x02"):
        raise CryptoError("missing last-record delimiter")
    return stripped[:-1]
