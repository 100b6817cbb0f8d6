"""TLS between the udp backend's ``stun`` discovery and the rendezvous server: the server's app
(stun.app.create_app) under uvicorn with a certificate from a CA this test makes.

The client verifies by default (the system's CAs do not know this CA: refused, naming
``COMFY_CLUSTER_STUN_CA_FILE``); with ``COMFY_CLUSTER_STUN_CA_FILE`` naming the CA a world forms
over https; a wrong CA, a missing file and a file that is no CA are refused naming the variable;
plain http is refused off loopback unless ``COMFY_CLUSTER_STUN_ALLOW_HTTP=1``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from collectives.auth import ClusterKey
from collectives.communicator import Communicator
from collectives.errors import ConfigurationError
from collectives.rendezvous.stun_client import StunClient, TlsVerifyError, server_url
from collectives.world import init
from tests.backends.stun_helpers import KEY, stun_env
from tests.backends.udp_worlds import run_world
from tests.stun.server_proc import REPO, free_port

_SERVE = """
import sys, uvicorn
from stun.app import create_app
from stun.settings import Settings
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
uvicorn.run(create_app(Settings.from_env()), host="127.0.0.1", port=port, log_level="warning",
            ssl_certfile=cert, ssl_keyfile=key)
"""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(tmp: Path, label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(label)).issuer_name(_name(label))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                       key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path = tmp / f"{label}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


@dataclass
class TlsServer:
    url: str
    ca_file: Path
    wrong_ca_file: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    tmp = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert, ca_file = _ca(tmp, "test-ca")
    _, _, wrong = _ca(tmp, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp / "server.pem", tmp / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    )
    port, udp = free_port(), free_port(socket.SOCK_DGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY_", "STUN_"))}
    env.update(COMFY_CLUSTER_AUTH_KEYS=f"tls:{KEY}", COMFY_CLUSTER_STUN_UDP_HOST="127.0.0.1",
               COMFY_CLUSTER_STUN_UDP_PORT=str(udp), PYTHONPATH=str(REPO))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(port), str(cert_file), str(key_file)], cwd=REPO, env=env
    )
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        end = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health", verify=ctx, timeout=1.0).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < end, "the server did not start"
            time.sleep(0.05)
        yield TlsServer(url, ca_file, wrong, proc)
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_world_forms_over_https_with_the_private_ca(tls_server: TlsServer) -> None:
    env = stun_env(tls_server.url, "tls", COMFY_CLUSTER_STUN_CA_FILE=str(tls_server.ca_file))

    def body(comm: Communicator) -> int:
        return int(comm.allreduce(np.full(8, comm.rank + 1))[0])

    assert run_world(2, env, body) == [3, 3]


def test_the_system_cas_do_not_trust_a_private_ca(tls_server: TlsServer) -> None:
    client = StunClient(tls_server.url, "tls", ClusterKey(KEY), environ={})
    try:
        with pytest.raises(TlsVerifyError, match=r"system's CAs.*COMFY_CLUSTER_STUN_CA_FILE"):
            client.members()
    finally:
        client.close()
    with pytest.raises(TlsVerifyError, match="COMFY_CLUSTER_STUN_CA_FILE"):
        init("udp", rank=0, size=2, environ=stun_env(tls_server.url, "tls"), timeout=5.0)


def test_a_wrong_ca_is_refused_naming_the_variable(tls_server: TlsServer) -> None:
    wrong = str(tls_server.wrong_ca_file)
    env = stun_env(tls_server.url, "tls", COMFY_CLUSTER_STUN_CA_FILE=wrong)
    with pytest.raises(
        TlsVerifyError, match=re.escape(f"COMFY_CLUSTER_STUN_CA_FILE={wrong}")
    ) as caught:
        init("udp", rank=0, size=2, environ=env, timeout=5.0)
    assert KEY not in str(caught.value)  # the key is never in a message


def test_a_bad_ca_file_is_a_configuration_error(tls_server: TlsServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    env = stun_env(tls_server.url, "tls", COMFY_CLUSTER_STUN_CA_FILE=str(missing))
    with pytest.raises(ConfigurationError, match=r"COMFY_CLUSTER_STUN_CA_FILE=.*no such file"):
        StunClient.from_env(env, ClusterKey(KEY))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    env["COMFY_CLUSTER_STUN_CA_FILE"] = str(junk)
    with pytest.raises(ConfigurationError, match=r"COMFY_CLUSTER_STUN_CA_FILE=.*not a PEM"):
        StunClient.from_env(env, ClusterKey(KEY))


def test_plain_http_policy() -> None:
    # Loopback: the key never leaves the machine.
    assert server_url("http://127.0.0.1:8089", {}) == "http://127.0.0.1:8089"
    assert server_url("http://localhost:8089", {}) == "http://localhost:8089"
    for url in ("http://10.0.0.2:8089", "http://stun.example.org"):
        with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_STUN_ALLOW_HTTP=1"):
            server_url(url, {})
        assert server_url(url, {"COMFY_CLUSTER_STUN_ALLOW_HTTP": "1"}) == url
    # No scheme means https.
    assert server_url("10.0.0.2:8089", {}) == "https://10.0.0.2:8089"
