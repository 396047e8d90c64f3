"""Serving behind the usual front doors: HTTPS (--ssl-keyfile/--ssl-certfile), a path prefix
(--root-path) and browser origins (--allowed-origins, CORS)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_process import run_server

from inferd.cli import main
from inferd.engine.async_llm import AsyncLLM
from inferd.server.app import create_app
from inferd.server.config import ServerConfig

ORIGIN = "https://app.example"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def test_https_under_a_path_prefix(tiny_llama: Path, tmp_path: Path) -> None:
    key_file, cert_file = _self_signed(tmp_path)
    args = ("--kv-cache-memory", "8MiB", "--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file))
    with run_server(tiny_llama, *args, "--root-path", "/llm", "--max-body-bytes", "4096") as server:
        assert server.base_url.startswith("https://")
        # The proxy takes the prefix off; the app's own links (its OpenAPI servers) put it back.
        with httpx.Client(verify=ssl.create_default_context(cafile=cert_file), timeout=30) as client:
            assert client.get(f"{server.base_url}/health").status_code == 200
            models = client.get(f"{server.base_url}/v1/models").json()
            assert [card["id"] for card in models["data"]] == [server.model]
            body = {"model": server.model, "prompt": "To be", "max_tokens": 2}
            assert client.post(f"{server.base_url}/v1/completions", json=body).status_code == 200
            assert client.get(f"{server.base_url}/openapi.json").json()["servers"] == [{"url": "/llm"}]
            # Errors raised outside the routes still take the protocol's shape under the prefix.
            missing = client.get(f"{server.base_url}/v1/nope")
            assert missing.status_code == 404 and "message" in missing.json()["error"]
            too_big = client.post(f"{server.base_url}/v1/completions", json={**body, "prompt": "x" * 5000})
            assert too_big.status_code == 413 and "message" in too_big.json()["error"]
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken there
            httpx.get(server.base_url.replace("https://", "http://") + "/health", timeout=10)


def test_a_model_folder_after_the_served_names_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--served-model-name` takes several names: a folder after it was meant as the model."""
    assert main(["serve", "--served-model-name", "foo", str(tmp_path)]) == 2
    assert "give the model folder before --served-model-name" in capsys.readouterr().err


def test_a_key_without_a_certificate_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path), "--ssl-keyfile", str(tmp_path / "key.pem")]) == 2
    assert "--ssl-keyfile and --ssl-certfile go together" in capsys.readouterr().err


@pytest.fixture
async def cors(tiny_llama: Path) -> AsyncIterator[httpx.AsyncClient]:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny", allowed_origins=(ORIGIN,), api_key="k"))
    llm.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client
    finally:
        llm.shutdown()


async def test_allowed_origins_get_cors_headers_and_others_do_not(cors: httpx.AsyncClient) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    answer = await cors.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    listed = await cors.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer k"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == ORIGIN
    # A refused request still carries the header, so the browser shows the client the 401.
    refused = await cors.get("/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = await cors.get(
        "/v1/models", headers={"Origin": "https://elsewhere.example", "Authorization": "Bearer k"}
    )
    assert "access-control-allow-origin" not in other.headers


async def test_no_cors_headers_unless_origins_are_allowed(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        answer = await client.get("/v1/models", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in answer.headers


def test_the_engine_step_timeout_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seconds, 600 by default; 0 turns the watch off; a negative number is refused."""
    from inferd.server import serve_cli

    taken: list[float | None] = []

    def load(model: object, **kwargs: object) -> None:
        taken.append(kwargs["step_timeout_s"])  # type: ignore[arg-type]
        raise SystemExit(0)

    monkeypatch.setattr(AsyncLLM, "from_options", load)
    for flags in ([], ["--engine-step-timeout", "0"], ["--engine-step-timeout", "2.5"]):
        with pytest.raises(SystemExit):
            main(["serve", *flags])
    assert taken == [600.0, None, 2.5]
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--engine-step-timeout", "-1"])
    assert refused.value.code == 2
    assert "must be a number of at least 0" in capsys.readouterr().err
    assert serve_cli.DEFAULT_STEP_TIMEOUT_S == 600.0
