"""A real OIDC issuer on loopback for tests: discovery and JWKS over HTTPS, keys that rotate.

Everything is generated at run time: a test CA, a server certificate for 127.0.0.1 signed
by it, RSA signing keys. Tokens are shaped like the providers' own (claims from Modal's
and GitHub's documentation). The issuer also plays GitHub Actions' ID-token request
endpoint (`/github/idtoken?audience=...`, bearer request token), the one provider
service a test cannot reach.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.realparts import send_json, serve_in_thread

HANDSHAKE_TIMEOUT = 30.0  # seconds a connection may take to say anything

@dataclass
class CertAuthority:
    cert: Path  # the CA certificate: the bundle a client trusts
    server_cert: Path
    server_key: Path

    def agent_env(self) -> dict[str, str]:
        """The test environment for an agent that trusts this CA for its OIDC issuers."""
        return dict(os.environ, CODESTORE_OIDC_CA_FILE=str(self.cert))


def make_ca(directory: Path, name: str = "codestore test CA") -> CertAuthority:
    """A CA and a certificate for 127.0.0.1/localhost signed by it (EC keys: fast)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = CertAuthority(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out.cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jwt(header: dict[str, object], claims: dict[str, object], signature: bytes = b"") -> str:
    """A JWT assembled by hand: for forgeries no honest library would produce."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def hs256(header: dict[str, object], claims: dict[str, object], secret: bytes) -> str:
    signing = raw_jwt(header, claims).rsplit(".", 1)[0]
    return signing + "." + b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())


@dataclass
class SigningKey:
    kid: str
    key: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, object]:
        d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        d.update(kid=self.kid, use="sig", alg="RS256")
        return d


def new_key() -> SigningKey:
    return SigningKey(f"k-{secrets.token_hex(4)}", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@dataclass
class Issuer:
    """Serve with `start_issuer`; `url` is the `iss` of every token it signs."""

    ca: CertAuthority
    url: str = ""
    published: list[SigningKey] = field(default_factory=list)  # what the JWKS lists
    requests: list[str] = field(default_factory=list)  # paths asked, in order
    tls_errors: list[str] = field(default_factory=list)  # handshakes that failed on the server's side
    github_request_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    github_audiences: list[str] = field(default_factory=list)
    github_claims: dict[str, Any] = field(default_factory=dict)  # overrides for its tokens
    _server: ThreadingHTTPServer | None = None

    @property
    def current(self) -> SigningKey:
        return self.published[-1]

    def rotate(self, keep_old: bool = False) -> SigningKey:
        """A new signing key, published at once; the old one is dropped unless kept."""
        key = new_key()
        self.published = [*self.published, key] if keep_old else [key]
        return key

    def jwks(self) -> dict[str, object]:
        return {"keys": [k.jwk() for k in self.published]}

    def fetches(self, path: str = "/jwks") -> int:
        return sum(1 for p in self.requests if p == path)

    def sign(self, claims: dict[str, object], *, key: SigningKey | None = None, header: dict[str, object] | None = None,
             algorithm: str = "RS256") -> str:
        key = key or self.current
        return jwt.encode(claims, key.key, algorithm=algorithm, headers={"kid": key.kid, "typ": "JWT", **(header or {})})

    def _times(self, lifetime: int, issued: int | None) -> dict[str, int]:
        iat = int(time.time()) if issued is None else issued
        return {"iat": iat, "nbf": iat - 5, "exp": iat + lifetime}

    def modal_claims(self, lifetime: int = 172800, issued: int | None = None, **over: object) -> dict[str, object]:
        """Modal's shape (docs: "Using OIDC to authenticate with external services"): 48 h lifetime."""
        c: dict[str, object] = {
            "iss": self.url, "aud": "oidc.modal.com", "jti": str(uuid.uuid4()),
            "workspace_id": "ac-12345abcd", "environment_id": "en-12345abcd", "environment_name": "main",
            "app_id": "ap-12345abcd", "app_name": "agent-runner", "function_id": "fu-12345abcd",
            "function_name": "run_task", "container_id": f"ta-{secrets.token_hex(5)}",
            **self._times(lifetime, issued),
        }
        c.update(over)
        c.setdefault("sub", f"modal:workspace_id:{c['workspace_id']}:environment_name:{c['environment_name']}:"
                            f"app_name:{c['app_name']}:function_name:{c['function_name']}:container_id:{c['container_id']}")
        return c

    def github_token_claims(self, aud: str, lifetime: int = 300, issued: int | None = None, **over: object) -> dict[str, object]:
        """GitHub Actions' shape (docs: "OpenID Connect reference")."""
        times = self._times(lifetime, issued)
        c: dict[str, object] = {
            "iss": self.url, "aud": aud, "jti": str(uuid.uuid4()),
            "sub": "repo:acme/app:ref:refs/heads/main", "repository": "acme/app", "repository_owner": "acme",
            "repository_id": "74", "repository_owner_id": "65", "repository_visibility": "private",
            "ref": "refs/heads/main", "ref_type": "branch", "sha": "e" * 40, "workflow": "CI",
            "job_workflow_ref": "acme/app/.github/workflows/ci.yml@refs/heads/main", "actor": "octocat",
            "actor_id": "12", "event_name": "push", "run_id": "6", "run_number": "1", "run_attempt": "1",
            "runner_environment": "github-hosted", **times,
        }
        c["nbf"] = times["iat"] - 600  # as in GitHub's documented example: nbf 10 min before iat
        c.update(over)
        return c

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Issuer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_issuer(ca: CertAuthority, path: str = "") -> Issuer:
    """Serve on 127.0.0.1:0 over HTTPS; `path` is an issuer path prefix (GHES uses /_services/token)."""
    issuer = Issuer(ca)
    issuer.rotate()

    class Handler(BaseHTTPRequestHandler):
        timeout = HANDSHAKE_TIMEOUT

        def setup(self) -> None:
            # The handshake runs here, on the connection's own thread: done in accept(), one
            # client that connects and stalls would hold every other client's fetch.
            super().setup()
            try:
                self.request.do_handshake()
            except OSError as e:
                issuer.tls_errors.append(f"{type(e).__name__}: {e}")
                raise

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            issuer.requests.append(parts.path)
            if parts.path == path + "/.well-known/openid-configuration":
                send_json(self, {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks",
                                 "id_token_signing_alg_values_supported": ["RS256"]})
            elif parts.path == path + "/jwks":
                send_json(self, issuer.jwks())
            elif parts.path == "/github/idtoken":
                if self.headers.get("Authorization") != f"bearer {issuer.github_request_token}":
                    send_json(self, {"message": "bad request token"}, 401)
                    return
                aud = parse_qs(parts.query).get("audience", [""])[0]
                issuer.github_audiences.append(aud)
                send_json(self, {"value": issuer.sign(issuer.github_token_claims(aud, **issuer.github_claims))})
            else:
                send_json(self, {}, 404)

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # the default 5 drops connections when a loaded suite bursts

        def handle_error(self, request: object, client_address: object) -> None:
            if isinstance(sys.exc_info()[1], ssl.SSLError):
                return  # a failed handshake: in issuer.tls_errors for the test, not a traceback in CI's output
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    server = Server(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ca.server_cert, ca.server_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.daemon_threads = True
    serve_in_thread(server)
    issuer._server = server
    issuer.url = f"https://127.0.0.1:{server.server_address[1]}{path}"
    # Paths above are relative to the server root; the discovery path follows the issuer's.
    return issuer

