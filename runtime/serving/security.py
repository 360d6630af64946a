"""TLS and the API key, shared by the gRPC server and the OpenAI-compatible HTTP front end
(`llamaforge serve --tls-cert FILE --tls-key FILE [--tls-client-ca FILE] [--api-key KEY]`; docs/serving.md,
"Production switches").

TLS: one certificate and key (PEM, the key unencrypted) serve both gRPC and HTTP, as trtllm-serve's and
vLLM's --ssl-certfile / --ssl-keyfile do; with a client CA both ports also require a client certificate
signed by it (mutual TLS, Triton's --grpc-root-cert). `load_tls` reads and checks the files before
anything binds, and names the flag of the file that is wrong. The metrics port stays plain HTTP, as
Triton's does.

API key: `Authorization: Bearer KEY` on HTTP /v1/* (401 otherwise) and the gRPC metadata entry
`authorization: Bearer KEY` (UNAUTHENTICATED otherwise), compared in constant time. Health stays open
for load-balancer probes: HTTP /v2/health/*, gRPC ServerLive and ServerReady (`OPEN_GRPC_METHODS`), as
vLLM leaves /health open.
"""

from __future__ import annotations

import hmac
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["API_KEY_ENV", "TlsConfig", "load_tls", "resolve_api_key", "bearer_matches", "ApiKeyInterceptor",
           "OPEN_GRPC_METHODS", "MISSING_KEY", "WRONG_KEY"]

API_KEY_ENV = "LLAMAFORGE_API_KEY"
_SERVICE = "/inference.GRPCInferenceService/"
OPEN_GRPC_METHODS = frozenset({_SERVICE + "ServerLive", _SERVICE + "ServerReady"})
MISSING_KEY = "missing API key: send it as 'Authorization: Bearer KEY'"
WRONG_KEY = "incorrect API key provided"

_CERT_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----")
_KEY_PEM = re.compile(rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?)PRIVATE KEY-----")


@dataclass(frozen=True)
class TlsConfig:
    """A checked certificate/key pair (and optional client CA), as files and as PEM bytes."""

    cert_file: Path
    key_file: Path
    cert_pem: bytes
    key_pem: bytes
    client_ca_file: Path | None = None
    client_ca_pem: bytes | None = None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem,
                                           require_client_auth=self.client_ca_pem is not None)

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's ssl_* arguments."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}
        if self.client_ca_file is not None:
            options.update(ssl_ca_certs=str(self.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


def _read(flag: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {os.fspath(path)!r}: {e.strerror or e}") from None


def load_tls(cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None,
             client_ca: str | os.PathLike[str] | None = None) -> TlsConfig | None:
    """The TLS settings of `serve`, checked (None: no TLS). ValueError names the flag at fault: a
    file missing or unreadable, not PEM of the right kind, an encrypted key, a key that does not
    match the certificate, one of the pair without the other, a client CA without the pair."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca: needs --tls-cert and --tls-key (client certificates are a TLS feature)")
        return None
    if cert is None:
        raise ValueError("--tls-cert: required with --tls-key (the server's certificate chain, PEM)")
    if key is None:
        raise ValueError("--tls-key: required with --tls-cert (the certificate's private key, PEM)")
    cert_pem, key_pem = _read("--tls-cert", cert), _read("--tls-key", key)
    if not _CERT_PEM.search(cert_pem):
        raise ValueError(f"--tls-cert: {os.fspath(cert)!r} has no PEM certificate ('-----BEGIN CERTIFICATE-----')")
    m = _KEY_PEM.search(key_pem)
    if m is None:
        raise ValueError(f"--tls-key: {os.fspath(key)!r} has no PEM private key ('-----BEGIN PRIVATE KEY-----')")
    if m.group(1) == b"ENCRYPTED ":
        raise ValueError(f"--tls-key: {os.fspath(key)!r} is encrypted; the server needs the key unencrypted "
                         "(e.g. `openssl pkey -in KEY -out KEY.plain`), readable only by its user")
    # Load the pair as the HTTP side will, so a mismatch or a bad PEM body is caught here, not in a thread.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise ValueError(f"--tls-key: {os.fspath(key)!r} is not the private key of the certificate in "
                             f"--tls-cert {os.fspath(cert)!r}") from None
        raise ValueError(f"--tls-cert/--tls-key: cannot load the pair: {e}") from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read("--tls-client-ca", client_ca)
        try:
            context.load_verify_locations(cafile=os.fspath(client_ca))
        except ssl.SSLError as e:
            raise ValueError(f"--tls-client-ca: cannot load {os.fspath(client_ca)!r} as PEM certificates: {e}") from None
    return TlsConfig(Path(cert), Path(key), cert_pem, key_pem, Path(client_ca) if client_ca is not None else None,
                     ca_pem)


def resolve_api_key(flag: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """--api-key, else $LLAMAFORGE_API_KEY (so the key need not show in `ps`); empty means none."""
    return flag or environ.get(API_KEY_ENV) or None


def bearer_matches(authorization: str | None, key: str) -> bool:
    """Whether an `Authorization` value is `Bearer KEY` (scheme case-insensitive, RFC 6750), with the
    key compared in constant time."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Every RPC but `open_methods` needs the metadata entry `authorization: Bearer KEY`."""

    def __init__(self, key: str, open_methods: frozenset[str] = OPEN_GRPC_METHODS) -> None:
        self.key = key
        self.open_methods = open_methods

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = getattr(handler_call_details, "method", "")
        if handler is None or method in self.open_methods:
            return handler
        values = [v for k, v in (getattr(handler_call_details, "invocation_metadata", None) or ())
                  if k == "authorization"]
        value = values[0] if values else None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if bearer_matches(value, self.key):
            return handler
        return _denied(handler, WRONG_KEY if value else MISSING_KEY)
