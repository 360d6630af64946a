"""Certificates for the TLS tests, made in the test run with `trustme` (a helper module, not a test file).

    pki = make_pki(tmp_path)
    llamaforge serve ENGINE --tls-cert pki.cert --tls-key pki.key [--tls-client-ca pki.ca]
    tritonclient.grpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki.ca))
    ssl.create_default_context(cafile=pki.ca)

`ca` is a self-signed CA; the server's pair is issued by it for 127.0.0.1, 127.0.0.2, ::1 and localhost;
the client's pair (mutual TLS) too. `other_ca` is an unrelated CA (a client that trusts only it must
refuse the server), `other_key` a key that is not the server certificate's.

    cert, key = make_self_signed(tmp_path)    # one self-signed certificate for 127.0.0.1, as
                                              # `openssl req -x509 ...` makes (docs/serving.md)
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Pki", "make_pki", "make_self_signed"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_key: Path

    def client_context(self, client_cert: bool = False) -> ssl.SSLContext:
        """A client context that trusts `ca` (and presents the client pair)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "127.0.0.2", "::1", "localhost")
    client = ca.issue_cert("client@llama-forge.test")
    stray = other.issue_cert("127.0.0.1")
    paths = {name: folder / f"{name}.pem" for name in
             ("ca", "cert", "key", "client_cert", "client_key", "other_ca", "other_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(paths["cert"]), append=True)
    server.private_key_pem.write_to_path(str(paths["key"]))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(paths["client_cert"]), append=True)
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    stray.private_key_pem.write_to_path(str(paths["other_key"]))
    return Pki(**paths)


def make_self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) files of a self-signed P-256 certificate for 127.0.0.1 and localhost; a
    client trusts it by using the certificate itself as its root."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "self-signed-cert.pem", folder / "self-signed-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file
