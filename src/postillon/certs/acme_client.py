"""One ACME order (RFC 8555 §7.4), blocking: run it in a worker thread.

Through certbot's ``acme`` library: account (new or found again by its key, §7.3.1),
order for the names, one challenge per authorization answered through the
``ChallengeBoard``, finalize with a fresh key's CSR, download the chain. The library
dropped TLS-ALPN-01 (RFC 8737); its challenge and response types are registered here,
which is all the library needs to carry them.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWK, JWKRSA

from postillon.certs.challenges import ChallengeBoard
from postillon.certs.storage import AcmeFiles

# How long the CA may take to validate and issue before the attempt counts as failed.
ORDER_SECONDS = 120.0
USER_AGENT = "postillon (ACME, RFC 8555)"


@challenges.ChallengeResponse.register
class TlsAlpn01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty) answer to a TLS-ALPN-01 challenge (RFC 8737 §3)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TlsAlpn01(challenges.KeyAuthorizationChallenge):
    """TLS-ALPN-01: a certificate for the name, presented on port 443 (RFC 8737)."""

    response_cls = TlsAlpn01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


class AcmeError(Exception):
    """An attempt failed; ``str()`` says why, with the CA's own words where it gave any."""


@dataclass(frozen=True, slots=True)
class OrderSettings:
    directory: str
    names: tuple[str, ...]
    email: str | None
    ca_file: Path | None
    # The challenge types this server can answer, preferred first.
    challenge_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Issued:
    chain_pem: bytes
    key_pem: bytes


def obtain(settings: OrderSettings, files: AcmeFiles, board: ChallengeBoard) -> Issued:
    """Order and fetch a certificate for ``settings.names``. Raises AcmeError."""
    try:
        return _obtain(settings, files, board)
    except errors.ValidationError as exc:
        raise AcmeError(_validation_failures(exc.failed_authzrs)) from None
    except messages.Error as exc:
        raise AcmeError(f"the CA refused: {exc}") from None
    except errors.Error as exc:
        raise AcmeError(f"{type(exc).__name__}: {exc}") from None
    except requests.RequestException as exc:
        raise AcmeError(f"cannot reach the ACME server {settings.directory}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise AcmeError(f"{type(exc).__name__}: {exc}") from None


def _obtain(settings: OrderSettings, files: AcmeFiles, board: ChallengeBoard) -> Issued:
    account_key = JWKRSA(key=files.account_key())
    # requests takes a CA bundle's path where a bool is typed.
    verify: Any = str(settings.ca_file) if settings.ca_file is not None else True
    net = client.ClientNetwork(account_key, user_agent=USER_AGENT, verify_ssl=verify)
    directory = client.ClientV2.get_directory(settings.directory, net)
    acme = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(
        email=settings.email, terms_of_service_agreed=True
    )
    try:
        acme.new_account(registration)
    except errors.ConflictError as exc:  # this key has an account already (§7.3.1)
        net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    order = acme.new_order(crypto_util.make_csr(key_pem, list(settings.names)))
    posted: list[tuple[str, str]] = []
    try:
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # validated recently (the CA may reuse authorizations)
            name = authz.body.identifier.value
            challenge = _pick(authz.body.challenges, settings.challenge_types)
            if challenge is None:
                offered = ", ".join(c.chall.typ for c in authz.body.challenges)
                raise AcmeError(
                    f"{name}: the CA offers {offered}; this server answers "
                    f"{', '.join(settings.challenge_types)}"
                )
            chall = challenge.chall
            assert isinstance(chall, challenges.KeyAuthorizationChallenge)
            key_authorization = chall.key_authorization(account_key)
            token = chall.encode("token")
            if isinstance(chall, TlsAlpn01):
                board.post_tls_alpn01(name, key_authorization)
            else:
                board.post_http01(token, key_authorization)
            posted.append((name, token))
            acme.answer_challenge(challenge, chall.response(account_key))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
        order = acme.poll_and_finalize(order, deadline)
    finally:
        for name, token in posted:
            board.withdraw(name, token)
    if not order.fullchain_pem:
        raise AcmeError("the CA finalized the order without a certificate")
    return Issued(order.fullchain_pem.encode("ascii"), key_pem)


def _pick(
    offered: Sequence[messages.ChallengeBody], types: tuple[str, ...]
) -> messages.ChallengeBody | None:
    for typ in types:
        for challenge in offered:
            if challenge.chall.typ == typ:
                return challenge
    return None


def _validation_failures(authzrs: Sequence[messages.AuthorizationResource]) -> str:
    """``mta-sts.example.org: tls-alpn-01: <the CA's detail>`` for each failed name."""
    parts = []
    for authzr in authzrs:
        name = authzr.body.identifier.value
        for challenge in authzr.body.challenges:
            if challenge.error is not None:
                detail = challenge.error.detail or challenge.error.typ
                parts.append(f"{name}: {challenge.chall.typ}: {detail}")
        if not any(c.error is not None for c in authzr.body.challenges):
            parts.append(f"{name}: authorization {authzr.body.status}")
    return "the CA refused the challenge: " + "; ".join(parts)
