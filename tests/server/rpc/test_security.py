"""TLS, mutual TLS and bearer tokens: a real server with certificates made for the test."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gradtap.client import Client, GradtapError, Objective, Result, aio
from gradtap.server import Settings, start
from gradtap.server.rpc.security import parse_tokens
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

ALL_MODELS = secrets.token_urlsafe(24)
MLP_ONLY = secrets.token_urlsafe(24)
X = np.random.default_rng(0).standard_normal((2, 784)).astype(np.float32)
IMAGES = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate it signed, and client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    server: bool = False,
) -> x509.Certificate:
    """A certificate for `key`: a self-signed CA when `issuer` is None, else a leaf."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("gradtap test CA", ca_key)
    rogue_ca = _certificate("some other CA", rogue_ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    signer = (ca.subject, ca_key)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    server = _write(
        directory, "server", _certificate("localhost", server_key, signer, server=True), server_key
    )
    client = _write(directory, "client", _certificate("a client", client_key, signer), client_key)
    rogue = _write(
        directory,
        "rogue",
        _certificate("a rogue client", rogue_key, (rogue_ca.subject, rogue_ca_key)),
        rogue_key,
    )
    return Pki(ca_path, *server, *client, *rogue)


@pytest.fixture(scope="module")
def secured(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server with TLS, client certificates required, and two tokens."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(
        f"# operators\n{ALL_MODELS}\n\n# CI may only use the MLP\n{MLP_ONLY} seed-mlp\n"
    )
    settings = Settings(
        device="cpu",
        builtins=True,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_token_file=tokens,
    )
    running = start("127.0.0.1:0", settings)
    yield f"127.0.0.1:{running.port}"
    running.server.stop(None).wait()


def tls_client(
    address: str, pki: Pki, token: str | None = ALL_MODELS, *, identity: str = "client"
) -> Client:
    """A client trusting the test CA, presenting the `identity` certificate ("" for none)."""
    cert = getattr(pki, f"{identity}_cert").read_bytes() if identity else None
    key = getattr(pki, f"{identity}_key").read_bytes() if identity else None
    return Client(
        address,
        timeout=60,
        token=token,
        root_certificates=pki.ca.read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )


def failure(call: Callable[[], object]) -> GradtapError:
    with pytest.raises(GradtapError) as info:
        call()
    return info.value


def analyze(c: Client, model: str = "seed-mlp") -> Result:
    inputs = X if model == "seed-mlp" else IMAGES
    return c.analyze(model, inputs, ["relu_1"], Objective.sum())


def test_tls_call_with_token_gives_the_same_numbers_as_a_plaintext_call(
    secured: str, pki: Pki, client: Client
) -> None:
    with tls_client(secured, pki) as c:
        secure = c.analyze("seed-mlp", X, ["relu_1"], Objective.sum(), activations=True)
    plain = client.analyze("seed-mlp", X, ["relu_1"], Objective.sum(), activations=True)
    assert secure.metadata["model_digest"] == plain.metadata["model_digest"]
    assert secure.loss == pytest.approx(plain.loss, rel=1e-6)
    for got, want in (
        (secure.gradients["relu_1"], plain.gradients["relu_1"]),
        (secure.activations["relu_1"], plain.activations["relu_1"]),
        (secure.outputs[0], plain.outputs[0]),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.abs(secure.gradients["relu_1"]).sum() > 0


def test_async_client_uses_tls_and_its_token(secured: str, pki: Pki) -> None:
    async def run() -> tuple[list[str], GradtapError]:
        tls = {
            "root_certificates": pki.ca.read_bytes(),
            "private_key": pki.client_key.read_bytes(),
            "certificate_chain": pki.client_cert.read_bytes(),
        }
        async with aio.Client(secured, timeout=30, token=MLP_ONLY, **tls) as c:
            names = [m.name for m in await c.list_models()]
            try:
                await c.describe("seed-convnet")
            except GradtapError as e:
                return names, e
        raise AssertionError("seed-convnet was described with a token restricted to seed-mlp")

    names, error = asyncio.run(run())
    assert names == ["seed-mlp"]
    assert (error.code, error.reason) == (DENIED, "MODEL_NOT_ALLOWED")


def test_plaintext_client_against_tls_server_is_unavailable(secured: str) -> None:
    with Client(secured, timeout=10, token=ALL_MODELS) as c:
        assert failure(c.list_models).code == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused_by_mutual_tls(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, identity="") as c:
        assert failure(c.list_models).code == grpc.StatusCode.UNAVAILABLE
        assert failure(c.health).code == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, identity="rogue") as c:
        assert failure(c.list_models).code == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_ca_is_unavailable(secured: str, pki: Pki) -> None:
    with Client(
        secured,
        timeout=10,
        token=ALL_MODELS,
        root_certificates=pki.rogue_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    ) as c:
        assert failure(c.list_models).code == grpc.StatusCode.UNAVAILABLE


def test_missing_token_is_unauthenticated_with_reason_missing_token(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, token=None) as c:
        for call in (c.list_models, lambda: c.describe("seed-mlp"), lambda: analyze(c)):
            error = failure(call)
            assert (error.code, error.reason) == (UNAUTHENTICATED, "MISSING_TOKEN")
            assert error.details.domain == "gradtap.v1"


def test_wrong_token_is_unauthenticated_and_not_echoed(secured: str, pki: Pki) -> None:
    wrong = secrets.token_urlsafe(24)
    with tls_client(secured, pki, token=wrong) as c:
        for call in (c.list_models, lambda: analyze(c)):
            error = failure(call)
            assert (error.code, error.reason) == (UNAUTHENTICATED, "INVALID_TOKEN")
            assert wrong not in str(error)


@pytest.mark.parametrize(
    "value", [ALL_MODELS, f"Basic {ALL_MODELS}", f"Bearer {ALL_MODELS} extra", "Bearer "]
)
def test_authorization_that_is_not_one_bearer_token_is_invalid_token(
    secured: str, pki: Pki, value: str
) -> None:
    tls = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(secured, tls) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=[("authorization", value)])
    assert info.value.code() == UNAUTHENTICATED
    assert ALL_MODELS not in (info.value.details() or "")


def test_bearer_scheme_is_case_insensitive(secured: str, pki: Pki) -> None:
    tls = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(secured, tls) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        response = stub.ListModels(
            pb.ListModelsRequest(), timeout=10, metadata=[("authorization", f"bearer {MLP_ONLY}")]
        )
    assert [m.name for m in response.models] == ["seed-mlp"]


def test_restricted_token_is_permission_denied_for_other_models(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, token=MLP_ONLY) as c:
        for call in (lambda: c.describe("seed-convnet"), lambda: analyze(c, "seed-convnet")):
            error = failure(call)
            assert (error.code, error.reason) == (DENIED, "MODEL_NOT_ALLOWED")
            assert "seed-convnet" in error.message
        # An unknown model is refused the same way: the token learns nothing about it.
        error = failure(lambda: c.describe("no-such-model"))
        assert (error.code, error.reason) == (DENIED, "MODEL_NOT_ALLOWED")


def test_restricted_token_may_use_its_own_model(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, token=MLP_ONLY) as c:
        assert c.describe("seed-mlp").name == "seed-mlp"
        result = analyze(c)
    assert result.gradients["relu_1"].shape[0] == X.shape[0]


def test_list_models_shows_a_restricted_token_only_its_models(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, token=MLP_ONLY) as c:
        assert [m.name for m in c.list_models()] == ["seed-mlp"]
    with tls_client(secured, pki, token=ALL_MODELS) as c:
        assert {"seed-mlp", "seed-convnet"} <= {m.name for m in c.list_models()}


def test_health_and_reflection_answer_without_a_token(secured: str, pki: Pki) -> None:
    with tls_client(secured, pki, token=None) as c:
        assert c.health() == "SERVING"
        assert c.health("gradtap.v1.GradientService") == "SERVING"
    tls = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(secured, tls) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "gradtap.v1.GradientService" in services


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (f"{ALL_MODELS}\n{MLP_ONLY} seed-mlp\n{ALL_MODELS} seed-convnet\n", "line 3 repeats"),
        (f"{ALL_MODELS} seed-mlp seed-convnet\n", "line 1: expected"),
        (f"# ok\n{ALL_MODELS} seed-mlp,\n", "line 2: expected"),
        (f"{ALL_MODELS} {MLP_ONLY}!\n", "line 1: expected"),
        ("# nothing but comments\n\n", "holds no token"),
        (f"{ALL_MODELS}\x07\n", "line 1: a token must be printable ASCII"),
    ],
    ids=["duplicate", "space-separated-models", "empty-entry", "bad-name", "empty", "control"],
)
def test_malformed_token_file_is_refused_at_startup_without_printing_tokens(
    tmp_path: Path, text: str, complaint: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(text)
    settings = Settings(device="cpu", builtins=False, auth_token_file=tokens)
    with pytest.raises(ValueError, match=complaint) as info:
        start("127.0.0.1:0", settings)
    assert ALL_MODELS not in str(info.value) and MLP_ONLY not in str(info.value)


def test_token_file_with_non_ascii_bytes_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_bytes("tökén\n".encode())
    with pytest.raises(ValueError, match="printable ASCII"):
        start("127.0.0.1:0", Settings(device="cpu", builtins=False, auth_token_file=tokens))


def test_token_file_format_reads_comments_blank_lines_and_allow_lists() -> None:
    grants = parse_tokens(
        "# comment\n\n  plain-token  \nlisted-token\tseed-mlp, seed-convnet\n  # indented\n"
    )
    assert [(g.line, g.models) for g in grants] == [
        (3, None),
        (4, frozenset({"seed-mlp", "seed-convnet"})),
    ]
    assert grants[0].allows("anything") and not grants[1].allows("anything")
    assert "plain-token" not in repr(grants)


def test_tls_cert_without_key_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        start("127.0.0.1:0", Settings(device="cpu", builtins=False, tls_cert=pki.server_cert))
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        start("127.0.0.1:0", Settings(device="cpu", builtins=False, tls_client_ca=pki.ca))
