"""LoRA adapters on the OpenAI server: `model: "base:adapter"`, adapters in /v1/models, hot load and unload
through `POST /v1/adapters` and `DELETE /v1/adapters/NAME` behind the API key. A tiny random Llama and PEFT
adapters made in the test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from agent_runtime.server.app import ServerSettings, create_app
from agent_runtime.server.security import SecuritySettings
from inference.async_engine import AsyncEngine
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.params import SamplingParams
from tests.agent_runtime.server.test_app import ServerThread
from tests.inference.test_lora import make_adapter
from tests.inference.test_models import PROMPT, _hf_model, save_tiny_tokenizer

pytest.importorskip("peft")
pytestmark = pytest.mark.anyio

KEY = "sekret"
SETTINGS = EngineConfig(block_size=4, max_model_len=64, num_blocks=128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served-lora")
    _hf_model("llama").save_pretrained(str(root / "base"))
    save_tiny_tokenizer(root / "base")
    make_adapter(
        "llama", root / "plain", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    make_adapter("llama", root / "second", 4, r=2, lora_alpha=2, target_modules=["o_proj", "up_proj"])
    return {"base": root / "base", "plain": root / "plain", "second": root / "second"}


@pytest.fixture(scope="module")
def served(folders: dict[str, Path]) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine(
        LLMEngine(
            load_model(folders["base"], dtype=torch.float32), SETTINGS, adapters={"plain": folders["plain"]}
        )
    )
    app = create_app(engine, settings=ServerSettings(security=SecuritySettings(api_key=KEY)), model_id="tiny")
    with ServerThread(app.app) as st:
        yield st.url, engine
    engine.close()


def expected_tokens(folders: dict[str, Path], adapter: str | None, n: int = 6) -> list[int]:
    adapters = {adapter: folders[adapter]} if adapter else {}
    engine = LLMEngine(load_model(folders["base"], dtype=torch.float32), SETTINGS, adapters=adapters)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, adapter=adapter)
    return engine.generate([PROMPT], params)[0].token_ids


def complete(client: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    return client.post("/v1/completions", json=body)


def test_adapters_served_listed_loaded_and_unloaded(
    served: tuple[str, AsyncEngine], folders: dict[str, Path]
) -> None:
    url, engine = served
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "tiny:plain"]
        assert client.get("/v1/models/tiny:plain").json()["kind"] == "adapter"

        # the adapter's text is the adapter's tokens, the base model's the base's
        text = {m: complete(client, m).json()["choices"][0]["text"] for m in ("tiny", "tiny:plain")}
        decode = engine.tokenizer.decode
        assert text["tiny:plain"] == decode(expected_tokens(folders, "plain"))
        assert text["tiny"] == decode(expected_tokens(folders, None))
        assert text["tiny"] != text["tiny:plain"]
        missing = complete(client, "tiny:second")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

        # hot load, use, unload
        loaded = client.post("/v1/adapters", json={"name": "second", "path": str(folders["second"])})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["id"] == "tiny:second" and loaded.json()["rank"] == 2
        assert loaded.json()["format"] == "lora"
        assert "tiny:second" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert complete(client, "tiny:second").json()["choices"][0]["text"] == decode(
            expected_tokens(folders, "second")
        )
        again = client.post("/v1/adapters", json={"name": "second", "path": str(folders["second"])})
        assert again.status_code == 409
        bad = client.post("/v1/adapters", json={"name": "bad", "path": str(folders["base"] / "nowhere")})
        assert bad.status_code == 400 and "adapter 'bad'" in bad.json()["error"]["message"]
        gone = client.delete("/v1/adapters/second")
        assert gone.status_code == 200 and gone.json() == {
            "name": "second",
            "object": "adapter",
            "deleted": True,
            "draining": False,
        }
        assert complete(client, "tiny:second").status_code == 404
        assert client.delete("/v1/adapters/second").status_code == 404
        assert [a.name for a in engine.adapters()] == ["plain"]

    # behind the API key
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        assert (
            anonymous.post("/v1/adapters", json={"name": "x", "path": str(folders["second"])}).status_code
            == 401
        )
        assert anonymous.delete("/v1/adapters/plain").status_code == 401
    assert [a.name for a in engine.adapters()] == ["plain"]


async def test_async_engine_unload_drains_in_flight(folders: dict[str, Path]) -> None:
    expected = expected_tokens(folders, "plain", n=20)
    engine = AsyncEngine(
        LLMEngine(
            load_model(folders["base"], dtype=torch.float32), SETTINGS, adapters={"plain": folders["plain"]}
        )
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, adapter="plain")
        stream = engine.generate(PROMPT, params)
        tokens: list[int] = []
        unloaded: Any = None
        async for out in stream:
            tokens += out.delta_token_ids
            if unloaded is None:  # after the first token: the request is in flight
                unloaded = await engine.unload_adapter("plain")
        assert unloaded is False and tokens == expected
        assert engine.adapters() == []
        info = await engine.load_adapter("plain", folders["second"])
        assert info.rank == 2
    finally:
        await engine.aclose()


def test_adapters_command_against_the_server(
    served: tuple[str, AsyncEngine], folders: dict[str, Path]
) -> None:
    url, engine = served

    def adapters(*args: str, key: str = KEY) -> subprocess.CompletedProcess[str]:
        # a process of its own, as people run it: the command configures logging for its process
        return subprocess.run(
            [sys.executable, "-m", "agent_runtime", "adapters", *args, "--url", url, "--api-key", key],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    loaded = adapters("load", "cli", str(folders["second"]))
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["id"] == "tiny:cli"
    listed = adapters("list")
    assert listed.returncode == 0 and json.loads(listed.stdout) == ["tiny:plain", "tiny:cli"]
    unloaded = adapters("unload", "cli")
    assert unloaded.returncode == 0 and json.loads(unloaded.stdout)["deleted"] is True
    again = adapters("unload", "cli")
    assert again.returncode == 2 and "404" in again.stderr
    assert adapters("load", "x", str(folders["second"]), key="wrong").returncode == 2
    assert [a.name for a in engine.adapters()] == ["plain"]
