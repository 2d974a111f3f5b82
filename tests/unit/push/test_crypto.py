"""Push cryptography: JWT encode → verify round trips, VAPID headers, the credential envelope and
RFC 8291 aes128gcm (checked against the RFC's own example too)."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sockudo.push import crypto
from tests.support import push_crypto


def test_es256_jwt_round_trip_and_tampering() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = crypto.jwt_es256({"kid": "KEY1234567"}, {"iss": "TEAM123456", "iat": 1700000000}, key)
    header, claims = push_crypto.jwt_verify(token, key.public_key())
    assert header == {"alg": "ES256", "kid": "KEY1234567"} and claims == {"iss": "TEAM123456", "iat": 1700000000}
    assert len(crypto.b64url_decode(token.rsplit(".", 1)[1])) == 64  # raw r‖s, not DER (JOSE)
    head, body, sig = token.split(".")
    forged = crypto.b64url(json.dumps({"iss": "OTHER", "iat": 1700000000}).encode())
    with pytest.raises(crypto.CryptoError):
        push_crypto.jwt_verify(f"{head}.{forged}.{sig}", key.public_key())
    with pytest.raises(crypto.CryptoError):
        push_crypto.jwt_verify(token, ec.generate_private_key(ec.SECP256R1()).public_key())


def test_rs256_jwt_round_trip() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = crypto.jwt_rs256({"typ": "JWT", "kid": "abc"}, {"iss": "sa@example", "aud": "https://t"}, key)
    header, claims = push_crypto.jwt_verify(token, key.public_key())
    assert header["alg"] == "RS256" and claims["aud"] == "https://t"
    with pytest.raises(crypto.CryptoError):  # an RS256 token is not accepted for an EC key
        push_crypto.jwt_verify(token, ec.generate_private_key(ec.SECP256R1()).public_key())


def test_vapid_header_carries_a_verifiable_token_and_the_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    header = crypto.vapid_authorization("https://push.example.net", "mailto:ops@example.com", key, now=1000)
    token, k = push_crypto.parse_vapid_authorization(header)
    assert crypto.b64url_decode(k) == crypto.p256_public_raw(key)
    _, claims = push_crypto.jwt_verify(token, crypto.p256_public_from_raw(crypto.b64url_decode(k)))
    assert claims == {"aud": "https://push.example.net", "exp": 1000 + 12 * 3600, "sub": "mailto:ops@example.com"}


def test_raw_vapid_private_key_round_trip() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    again = crypto.p256_private_from_raw(crypto.b64url(push_crypto.p256_raw_private(key)))
    assert crypto.p256_public_raw(again) == crypto.p256_public_raw(key)
    with pytest.raises(crypto.CryptoError):
        crypto.p256_private_from_raw(crypto.b64url(b"short"))


def test_credential_envelope_is_bound_to_key_and_subject() -> None:
    sealed = crypto.seal("key-1", b'{"privateKey": "secret"}', "push-credential:app:apns")
    assert sealed.startswith("envelope:v1:aes256gcm:") and "secret" not in sealed
    assert crypto.unseal("key-1", sealed, "push-credential:app:apns") == b'{"privateKey": "secret"}'
    with pytest.raises(crypto.CryptoError):
        crypto.unseal("key-2", sealed, "push-credential:app:apns")
    with pytest.raises(crypto.CryptoError):  # copied to another app or provider: refused
        crypto.unseal("key-1", sealed, "push-credential:other:apns")
    assert crypto.seal("key-1", b"x", "a") != crypto.seal("key-1", b"x", "a")  # fresh nonce each time


def test_webpush_encrypt_decrypt_round_trip() -> None:
    ua = ec.generate_private_key(ec.SECP256R1())
    auth = crypto.b64url(os.urandom(16))
    message = json.dumps({"notification": {"title": "Hi"}}).encode()
    body = crypto.webpush_encrypt(message, crypto.b64url(crypto.p256_public_raw(ua)), auth)
    assert body[20] == 65 and int.from_bytes(body[16:20], "big") == 4096  # RFC 8188 header: rs, idlen, keyid
    assert push_crypto.webpush_decrypt(body, ua, auth) == message
    with pytest.raises(crypto.CryptoError):  # another subscription's keys cannot read it
        push_crypto.webpush_decrypt(body, ec.generate_private_key(ec.SECP256R1()), auth)
    with pytest.raises(crypto.CryptoError):
        push_crypto.webpush_decrypt(body, ua, crypto.b64url(os.urandom(16)))


def test_rfc8291_example_vector() -> None:
    """RFC 8291 §5: the published keys, salt and message give the published body."""
    ua_private = crypto.p256_private_from_raw("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")
    sender = crypto.p256_private_from_raw("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")
    auth = "BTBZMqHH6r4Tts7J_aSIgg"
    salt = crypto.b64url_decode("DGv6ra1nlYgDCS1FRnbzlw")
    body = crypto.webpush_encrypt(
        b"When I grow up, I want to be a watermelon",
        crypto.b64url(crypto.p256_public_raw(ua_private)),
        auth,
        sender=sender,
        salt=salt,
    )
    expected = (
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK"
        "6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
    )
    assert crypto.b64url(body) == expected
    assert push_crypto.webpush_decrypt(body, ua_private, auth) == b"When I grow up, I want to be a watermelon"
