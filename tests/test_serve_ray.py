"""The server as a Ray Serve application: a local Ray cluster, two replicas, started and stopped by the test."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml
from conftest import free_port
from PIL import Image

from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.defaults import require_model
from vtw_core.models.prompts import user_message

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
QUESTIONS = [
    ("easyvqa-0.png", "what is the red shape?", "vtw:9"),
    ("easyvqa-1.png", "what is the color of the rectangle?", "baseline"),
    ("easyvqa-2.png", "is there a rectangle?", "vtw:9"),
    ("easyvqa-0.png", "what color is the shape?", "vtw:6"),
]
TOKENS = 10
# Before Ray is first imported (it reads them then): a single-node cluster on 127.0.0.1 only, not on the
# machine's network address, and no usage reports.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def load_config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_the_shipped_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from vtw_core.serve.ray_app import build

    config = ServeDeploySchema.model_validate(load_config())
    application = config.applications[0]
    assert application.import_path == "vtw_core.serve.ray_app:build"
    assert build(application.args) is not None  # the builder takes the config's arguments
    with pytest.raises(ValueError, match="unknown arguments"):
        build({"modle": "x"})


@pytest.fixture(scope="module")
def ray_url():
    """Ray on the loopback address only (no cluster networking), Serve's proxy on a free local port."""
    import ray
    from ray import serve

    from vtw_core.serve.ray_app import build

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {**load_config()["applications"][0]["args"], "num_replicas": 2, "num_cpus": 1}
        serve.run(build(args), name="vtw", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager.load(require_model(None), device="cpu")


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_two_replicas_answer_concurrent_questions_without_cross_talk(ray_url, manager):
    from ray import serve

    status = serve.status().applications["vtw"].deployments["VTWServer"]
    assert status.replica_states == {"RUNNING": 2}
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(item: tuple[str, str, str]):
        image, text, method = item
        content = [{"type": "image_url", "image_url": {"url": data_url(EXAMPLES / image)}},
                   {"type": "text", "text": text}]  # fmt: skip
        return client.chat.completions.with_raw_response.create(
            model="default-model", messages=[{"role": "user", "content": content}], max_tokens=TOKENS,
            temperature=0, extra_body={"vtw": {"method": method, "return_token_ids": True}},
        )  # fmt: skip

    requests = QUESTIONS * 2
    with ThreadPoolExecutor(len(requests)) as pool:
        raw = list(pool.map(ask, requests))
    replicas = {response.headers["x-vtw-replica"] for response in raw}
    assert 1 <= len(replicas) <= 2
    for (image, text, method), response in zip(requests, raw, strict=True):
        reply = response.parse()
        k = None if method == "baseline" else int(method.split(":")[1])
        expected = manager.generate([user_message(text)], [Image.open(EXAMPLES / image)], k=k,
                                    sampling=SamplingConfig(TOKENS))  # fmt: skip
        assert reply.choices[0].model_extra["token_ids"] == expected.token_ids
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.model_extra["vtw"]["k"] == k


def test_errors_keep_the_openai_format_through_ray(ray_url):
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default-model", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"vtw": {"method": "vtw:999"}})  # fmt: skip
    assert caught.value.body["param"] == "vtw.method"
    assert [model.id for model in client.models.list().data] == ["default-model"]


def test_the_app_can_run_against_the_deployment(ray_url, manager):
    """`python app.py --backend-url`: the app's manager stand-in gets the in-process answer from the replicas."""
    from app.remote import RemoteManager

    remote = RemoteManager(ray_url)
    image, text, _ = QUESTIONS[0]
    conversation = [user_message(text)]
    got = remote.generate(conversation, [Image.open(EXAMPLES / image)], k=9, sampling=SamplingConfig(TOKENS))
    expected = manager.generate(conversation, [Image.open(EXAMPLES / image)], k=9, sampling=SamplingConfig(TOKENS))
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.stats.prefill_flops == expected.stats.prefill_flops and got.stats.k == 9
