"""`inferd serve --model-repository DIR --grpc-port P`: one server holds the LLM and the classic models."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
from kserve_support import free_port
from server_process import run_server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def test_inferd_serve_mounts_the_model_repository(tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "digits", tmp_path / "digits")
    grpc_port = free_port()
    with run_server(tiny_llama, "--model-repository", str(tmp_path), "--grpc-port", str(grpc_port)) as server:
        assert httpx.get(f"{server.base_url}/v2/models/digits/ready", timeout=10).status_code == 200
        assert httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code == 200  # the LLM side
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        image = triton_grpc.InferInput("image", [1, 8, 8], "FP32")
        image.set_data_from_numpy(np.zeros((1, 8, 8), dtype=np.float32))
        confidence = client.infer("digits", [image]).as_numpy("confidence")
        assert confidence.shape == (1, 1) and 0.0 < float(confidence[0, 0]) <= 1.0
        families = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        assert 'inferd_kserve_requests_total{model="digits",outcome="success"}' in families


def test_api_key_guards_the_v2_and_embedding_routes_but_not_health(tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "digits", tmp_path / "digits")
    args = ("--model-repository", str(tmp_path), "--grpc-port", str(free_port()), "--api-key", "sesame")
    with run_server(tiny_llama, *args) as server:
        url = f"{server.base_url}/v2/models/digits"
        assert httpx.get(f"{server.base_url}/v2/health/ready", timeout=10).status_code == 200
        refused = httpx.get(url, timeout=10)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        embeddings = httpx.post(
            f"{server.base_url}/v1/embeddings", json={"model": "digits", "input": "x"}, timeout=10
        )
        assert embeddings.status_code == 401
        assert embeddings.json()["error"]["code"] == "invalid_api_key"  # as on the other OpenAI routes
        assert httpx.get(url, headers={"Authorization": "Bearer sesame"}, timeout=10).status_code == 200
