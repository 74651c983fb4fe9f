"""External authentication: a Login that carries a credential another system issued.

A :class:`~bitchat.im.packets.Login` with ``jwt`` set is handed to the service's
:class:`Authenticator`, which checks the credential and says who it is (an
:class:`Identity`: a subject in the authenticator's namespace, and the name the
user should get). The service then finds the user that subject maps to, creating
one at its first login (the stores keep the mapping, ``external_users``), and the
login goes on as a password login would: a device, a token for reconnects.

The default is :class:`JwtAuthenticator`: JWTs the product's backend signed,
checked with PyJWT against the ``jwt_*`` settings. Another scheme plugs in as a
subclass::

    class MyTickets(Authenticator):
        provider = "tickets"

        async def authenticate(self, credential: str) -> Identity:
            user = await my_backend.check(credential)  # your own call
            if user is None:
                raise login_failed("the ticket is unknown")
            return Identity(self.provider, user.id, user.nickname)

    server = build_server(settings, authenticator=MyTickets())

A refusal is :func:`login_failed` (code ``login_failed``) with a message that
says why; the client sees it as it is.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitchat.errors import ConfigError, RequestError, codes
from bitchat.settings import Settings

if TYPE_CHECKING:
    import jwt

log = logging.getLogger("bitchat.im.auth")

_HMAC = "HS256"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a credential says the user is."""

    provider: str
    """The namespace of ``subject`` (one per scheme: ``jwt`` for the default)."""
    subject: str
    """The user's stable id in that namespace: the same subject is the same user."""
    name: str = ""
    """The name wished for the user, used at the first login only (made valid and
    free by the service); empty: the subject's."""


def login_failed(why: str) -> RequestError:
    """The refusal of a credential: code ``login_failed``, ``why`` as the message."""
    return RequestError(codes.LOGIN_FAILED, why)


class Authenticator(abc.ABC):
    """Checks the ``jwt`` field of a Login. The service calls :meth:`start` as it
    starts (a bad configuration stops the server there) and :meth:`close` as it stops."""

    provider: str = "external"

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Load keys, open connections."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what start took."""

    @abc.abstractmethod
    async def authenticate(self, credential: str) -> Identity:
        """The identity ``credential`` proves, or :func:`login_failed` saying why not."""


# PyJWT is imported where it is used: with it comes ``cryptography`` (about 8 MiB
# of resident memory), which a server without JWT logins never needs.


def _why(exc: Exception) -> str | None:
    """The cause a client is told of one of PyJWT's errors (most specific first)."""
    import jwt

    for kind, why in (
        (jwt.ExpiredSignatureError, "the JWT has expired"),
        (jwt.InvalidSignatureError, "the JWT has a bad signature"),
        (jwt.InvalidAudienceError, "the JWT is for the wrong audience (aud)"),
        (jwt.InvalidIssuerError, "the JWT has the wrong issuer (iss)"),
        (jwt.ImmatureSignatureError, "the JWT is not valid yet (nbf or iat)"),
        (jwt.InvalidAlgorithmError, "the JWT's algorithm (alg) is not allowed"),
    ):
        if isinstance(exc, kind):
            return why
    return None


class JwtAuthenticator(Authenticator):
    """JWTs signed with HS256 (``jwt_secret``) or RS256/ES256 (``jwt_public_key_file``,
    or ``jwt_jwks_file`` by ``kid``), with ``exp`` required and ``iss`` / ``aud``
    checked when set. The subject is the ``jwt_user_claim``, the name the
    ``jwt_name_claim``. The key set file is read again when a token names a kid it
    does not have and the file changed since (so keys rotate without a restart)."""

    provider = "jwt"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._public: tuple[str, Any] | None = None  # (alg, key) of jwt_public_key_file
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._jwks_stat: tuple[int, int, int] | None = None
        self.jwks_reads = 0
        """Times the key set file was read."""

    @property
    def configured(self) -> bool:
        s = self.settings
        return bool(s.jwt_secret or s.jwt_public_key_file or s.jwt_jwks_file)

    async def start(self) -> None:
        s = self.settings
        if s.jwt_secret and len(s.jwt_secret.encode()) < 32:
            # RFC 7518 3.2: an HS256 key has at least 256 bits; a short one can be guessed.
            log.warning("jwt_secret has fewer than 32 bytes: tokens signed with it can be forged")
        if s.jwt_public_key_file:
            self._public = _load_public_key(s.jwt_public_key_file)
        if s.jwt_jwks_file:
            self._read_jwks(s.jwt_jwks_file, at_start=True)

    def _read_jwks(self, path: str, at_start: bool = False) -> None:
        import jwt

        try:
            st = os.stat(path)
            stat = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stat == self._jwks_stat:
                return
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            keys = jwt.PyJWKSet.from_dict(data).keys
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            if at_start:
                raise ConfigError(f"jwt_jwks_file {path}: {exc}") from exc
            # A rotation half-written: the keys read before stay.
            log.warning("cannot read the JWT key set %s: %s", path, exc)
            return
        self.jwks_reads += 1
        self._jwks_stat = stat
        self._jwks = {k.key_id or "": k for k in keys}

    def _key(self, header: dict[str, Any]) -> Any:
        """The key to check a token with this header against, or a refusal."""
        s = self.settings
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise login_failed("the JWT names no algorithm (alg)")
        if alg == _HMAC:
            if not s.jwt_secret:
                raise login_failed("no key is configured for HS256 JWTs (jwt_secret)")
            return s.jwt_secret
        kid = header.get("kid")
        if s.jwt_jwks_file and (kid is not None or self._public is None):
            if not isinstance(kid, str):
                if len(self._jwks) != 1:
                    raise login_failed("the JWT names no key (kid) of the key set")
                [found] = self._jwks.values()
            else:
                if kid not in self._jwks:
                    self._read_jwks(s.jwt_jwks_file)
                if kid not in self._jwks:
                    raise login_failed(f"the JWT's key (kid {kid!r}) is not in the key set")
                found = self._jwks[kid]
            if found.algorithm_name != alg:
                raise login_failed(f"the JWT's algorithm {alg} is not its key's")
            return found
        if self._public is not None:
            key_alg, key = self._public
            if alg != key_alg:
                raise login_failed(f"the JWT's algorithm {alg} is not its key's ({key_alg})")
            return key
        raise login_failed(f"no key is configured for {alg} JWTs")

    async def authenticate(self, credential: str) -> Identity:
        s = self.settings
        if not self.configured:
            raise login_failed(
                "JWT login is not set up on this server: no key is configured "
                "(jwt_secret, jwt_public_key_file or jwt_jwks_file)"
            )
        import jwt

        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            raise login_failed("the JWT is malformed") from None
        key = self._key(header)
        alg = str(header["alg"])
        try:
            claims = jwt.decode(
                credential,
                key,
                algorithms=[alg],
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway,
                options={"require": ["exp"]},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise login_failed(f"the JWT has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            why = _why(exc)
            raise login_failed(why or f"the JWT is invalid: {exc}") from None
        subject = claims.get(s.jwt_user_claim)
        if isinstance(subject, int) and not isinstance(subject, bool):
            subject = str(subject)
        if not isinstance(subject, str) or not subject:
            raise login_failed(f"the JWT has no {s.jwt_user_claim!r} claim")
        name = claims.get(s.jwt_name_claim)
        return Identity(self.provider, subject, name if isinstance(name, str) else "")


def _load_public_key(path: str) -> tuple[str, Any]:
    """(alg, key) of a PEM public key: RS256 for RSA, ES256 for P-256."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"jwt_public_key_file {path}: {exc}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ConfigError(f"jwt_public_key_file {path}: expected an RSA or a P-256 public key")
