"""`inferd serve --model-repository DIR --grpc-port P`: one server holds the LLM and the classic models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from kserve_support import free_port
from server_process import run_server
from tritonclient.utils import InferenceServerException

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
    grpc_port = free_port()
    args = ("--model-repository", str(tmp_path), "--grpc-port", str(grpc_port), "--api-key", "sesame")
    with run_server(tiny_llama, *args) as server:
        # gRPC: the health calls open, everything else needs the key in the metadata.
        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert grpc_client.is_server_live() and grpc_client.is_server_ready()
        image = triton_grpc.InferInput("image", [1, 8, 8], "FP32")
        image.set_data_from_numpy(np.zeros((1, 8, 8), dtype=np.float32))
        for call in (
            lambda **auth: grpc_client.infer("digits", [image], **auth),
            lambda **auth: grpc_client.get_model_metadata("digits", **auth),
            lambda **auth: grpc_client.get_model_repository_index(**auth),
        ):
            with pytest.raises(InferenceServerException) as refused_call:
                call(headers={"authorization": "Bearer wrong"})
            assert refused_call.value.status() == "StatusCode.UNAUTHENTICATED"
            call(headers={"authorization": "Bearer sesame"})
        streamed: list[Any] = []
        grpc_client.start_stream(callback=lambda result, error: streamed.append(error or result))
        try:
            grpc_client.async_stream_infer("digits", [image])
        except InferenceServerException:  # the refusal ended the stream before the request went out
            pass
        grpc_client.stop_stream()
        assert len(streamed) == 1 and "StatusCode.UNAUTHENTICATED" in str(streamed[0])
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
