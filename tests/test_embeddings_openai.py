"""`POST /v1/embeddings` with the OpenAI SDK against a live server holding a tiny sentence-embedding model."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from kserve_support import LiveServer, build_tiny_bert, running_server
from prometheus_client.parser import text_string_to_metric_families

from inferd.serving.config import read_model_config
from inferd.serving.runtimes.registry import default_runtime_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
TEXTS = ["good movie", "the movie is awful", "great"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    embedder = build_tiny_bert(root / "tiny-embedder", "embedding")
    config = {
        "runtime": "sentence_embedding",
        "max_batch_size": 8,
        "max_queue_delay_ms": 5,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
        "outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [16]},
            {"name": "token_count", "datatype": "INT64", "shape": [1]},
        ],
    }
    (embedder / "model.json").write_text(json.dumps(config))
    # The same encoder with its embedding width left open (-1) in the configuration.
    shutil.copytree(embedder, root / "open-embedder")
    open_outputs = [{**config["outputs"][0], "shape": [-1]}, config["outputs"][1]]  # type: ignore[index]
    (root / "open-embedder" / "model.json").write_text(json.dumps({**config, "outputs": open_outputs}))
    shutil.copytree(EXAMPLES / "digits", root / "digits")
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[LiveServer]:
    with running_server(repository) as live:
        yield live


def _direct_embeddings(repository: Path) -> dict[str, np.ndarray]:
    model_dir = repository / "tiny-embedder"
    runtime = default_runtime_registry().load(model_dir, read_model_config(model_dir))
    return runtime.infer({"text": np.array([[t.encode()] for t in TEXTS], dtype=object)})


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_equal_the_runtime(server: LiveServer, repository: Path, encoding_format: str) -> None:
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    response = client.embeddings.create(model="tiny-embedder", input=TEXTS, encoding_format=encoding_format)
    direct = _direct_embeddings(repository)
    assert [item.index for item in response.data] == [0, 1, 2]
    if encoding_format == "base64":  # the SDK hands base64 back undecoded when asked for it explicitly
        got = np.stack(
            [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in response.data]
        )
    else:
        got = np.array([item.embedding for item in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, direct["embedding"], rtol=1e-5, atol=1e-6)
    assert response.usage.prompt_tokens == int(direct["token_count"].sum()) == response.usage.total_tokens
    assert response.model == "tiny-embedder"


def test_sdk_default_base64_decodes_to_the_float_embeddings(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    default = client.embeddings.create(model="tiny-embedder", input="good movie")
    floats = client.embeddings.create(model="tiny-embedder", input="good movie", encoding_format="float")
    np.testing.assert_allclose(default.data[0].embedding, floats.data[0].embedding, rtol=1e-6)


def test_base64_is_little_endian_float32(server: LiveServer) -> None:
    body = {"model": "tiny-embedder", "input": "good movie", "encoding_format": "base64"}
    data = httpx.post(f"{server.http_url}/v1/embeddings", json=body, timeout=30).json()["data"]
    floats = httpx.post(
        f"{server.http_url}/v1/embeddings", json={**body, "encoding_format": "float"}, timeout=30
    ).json()["data"]
    decoded = np.frombuffer(base64.b64decode(data[0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats[0]["embedding"], rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "nope", "input": "x"}, 404),
        ({"model": "digits", "input": "x"}, 400),
        ({"model": "tiny-embedder", "input": []}, 400),
        ({"model": "tiny-embedder", "input": [1, 2]}, 400),
        ({"model": "tiny-embedder", "input": "x", "encoding_format": "int8"}, 400),
        ({"model": "tiny-embedder", "input": ""}, 400),
        ({"model": "tiny-embedder", "input": ["x", ""]}, 400),
        ({"model": "tiny-embedder", "input": "x", "dimensions": 3}, 400),
        ({"model": "tiny-embedder", "input": "x", "dimensions": "16"}, 400),
        ({"model": "tiny-embedder", "input": "x", "dimensions": 0}, 400),
        # vLLM's options the encoder cannot follow: refused, not ignored.
        ({"model": "tiny-embedder", "input": "x", "normalize": False}, 400),
        ({"model": "tiny-embedder", "input": "x", "priority": 1}, 400),
        ({"model": "tiny-embedder", "input": "x", "add_special_tokens": False}, 400),
        ({"model": "tiny-embedder", "input": "x", "normalize": True, "priority": 0}, 200),
    ],
)
def test_embedding_errors(server: LiveServer, body: dict[str, object], status: int) -> None:
    response = httpx.post(f"{server.http_url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == status
    assert status == 200 or response.json()["error"]["message"]


def test_embedding_errors_take_the_openai_routes_codes(server: LiveServer) -> None:
    url = f"{server.http_url}/v1/embeddings"
    unknown = httpx.post(url, json={"model": "nope", "input": "x"}, timeout=30).json()["error"]
    assert (unknown["type"], unknown["code"], unknown["param"]) == (
        "invalid_request_error",
        "model_not_found",
        "model",
    )
    nested = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert nested.status_code == 400 and "not valid JSON" in nested.json()["error"]["message"]
    # Past Python's 4,300-digit limit, its JSON reader raises a plain ValueError: a 500 before.
    digits = httpx.post(url, content=b'{"model": "m", "input": ' + b"1" * 5000 + b"}", timeout=30)
    assert digits.status_code == 400 and "not valid JSON" in digits.json()["error"]["message"]


def test_dimensions_equal_to_the_models_width_are_accepted(server: LiveServer) -> None:
    url = f"{server.http_url}/v1/embeddings"
    width = len(
        httpx.post(url, json={"model": "tiny-embedder", "input": "x"}, timeout=30).json()["data"][0][
            "embedding"
        ]
    )
    same = httpx.post(url, json={"model": "tiny-embedder", "input": "x", "dimensions": width}, timeout=30)
    assert same.status_code == 200


@pytest.mark.parametrize("model", ["tiny-embedder", "open-embedder"])
def test_a_width_the_model_rules_out_is_refused_before_any_text_is_embedded(
    server: LiveServer, model: str
) -> None:
    """The encoder gives 16-dimensional embeddings, declared in the configuration or (left open
    there) read from the encoder's: asking for 3 costs the model no inference."""

    def inferences() -> float:
        text = httpx.get(f"{server.http_url}/metrics", timeout=30).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "inferd_kserve_requests_total" and sample.labels["model"] == model
        )

    url = f"{server.http_url}/v1/embeddings"
    assert httpx.post(url, json={"model": model, "input": "x"}, timeout=30).status_code == 200
    before = inferences()
    assert before > 0  # the counter counts this model's inferences
    body = {"model": model, "input": ["a", "b"], "dimensions": 3}
    refused = httpx.post(url, json=body, timeout=30)
    assert refused.status_code == 400 and "16-dimensional" in refused.json()["error"]["message"]
    assert inferences() == before


@pytest.mark.parametrize("dimensions", [0, -3, "16", 16.0, True])
def test_a_dimensions_that_is_not_a_positive_integer_is_refused_with_the_body(dimensions: object) -> None:
    """When the body is read, before the model is looked up or any text embedded, whatever width
    the model's configuration declares (or leaves open)."""
    from inferd.server.openai_embeddings import _parse_form
    from inferd.serving.errors import InvalidInputError

    body = {"model": "no-such-model", "input": "x", "dimensions": dimensions}
    with pytest.raises(InvalidInputError, match="'dimensions' must be a positive integer"):
        _parse_form(body)
    assert _parse_form({**body, "dimensions": 16})[2] == 16
