"""The LLM labeller and scorer against a fake OpenAI-compatible server on 127.0.0.1 that records each request."""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest

from sae_pipeline import quality
from sae_pipeline.defs.assets import feature_labels, features, sae
from sae_pipeline.labelling import (
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_MODEL,
    ChatClient,
    LLMError,
    LLMLabeller,
    label_features,
)
from sae_pipeline.scoring import LLMScorer
from sae_pipeline_tests.conftest import Pipeline, tiny_topk
from sae_pipeline_tests.test_labelling import DEAD, NEAR_ZERO, PLANTED
from sae_pipeline_tests.test_labelling import features as features_table  # noqa: F401  (fixture)

KEY = "sk-test-SECRET-0123456789"
LABEL = "the word import"


class FakeServer:
    """Answers labelling prompts with LABEL and detection prompts with all-ones; keeps every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                messages = json.loads(body)["messages"]
                if messages[1]["content"].startswith("Explanation:"):  # a detection (scoring) prompt
                    n = len(re.findall(r"^Example \d+:", messages[1]["content"], flags=re.M))
                    content = json.dumps([1] * n)
                else:
                    content = LABEL
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def labelling_requests(self) -> list[dict]:
        return [r for r in self.requests
                if not json.loads(r["body"])["messages"][1]["content"].startswith("Explanation:")]


@pytest.fixture
def server():
    fake = FakeServer()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def _check_request_hygiene(request: dict) -> None:
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in request["body"]
    assert json.loads(request["body"])["model"] == "fake-model"


def test_labeller_sends_live_latents_with_examples_and_key_in_header_only(server, features_table):  # noqa: F811
    client = ChatClient(server.url, "fake-model", KEY)
    assert KEY not in repr(client)
    labels = label_features(features_table, LLMLabeller(client))
    sent = server.labelling_requests()
    latents_sent = [int(re.search(r"^Latent (\d+) ", json.loads(r["body"])["messages"][1]["content"]).group(1))
                    for r in sent]
    assert latents_sent == labels["latent_id"].to_list() == [0, 1, 4]
    assert DEAD not in latents_sent and NEAR_ZERO not in latents_sent
    for request in sent:
        _check_request_hygiene(request)
    planted = json.loads(sent[0]["body"])["messages"][1]["content"]
    assert "Example 1:" in planted and "<<import>>" in planted and "import (1.70)" in planted
    assert labels.filter(pl.col("latent_id") == PLANTED)["label"][0] == LABEL
    assert set(labels["labeller"].to_list()) == {"llm:fake-model"}


def test_scorer_parses_the_answer_and_endpoint_errors_hide_the_key(server):
    scorer = LLMScorer(ChatClient(server.url, "fake-model", KEY))
    assert scorer.predict("words", [["a"], ["b"], ["c"]]) == [True, True, True]
    _check_request_hygiene(server.requests[-1])
    broken = ChatClient("http://127.0.0.1:9/v1", "fake-model", KEY, timeout=2)
    with pytest.raises(LLMError) as error:
        broken.complete([{"role": "user", "content": "hi"}])
    assert KEY not in str(error.value)
    with pytest.raises(LLMError, match=ENV_BASE_URL):
        ChatClient.from_env({ENV_API_KEY: KEY})


def test_feature_labels_with_the_llm_through_dagster(pipeline: Pipeline, server, monkeypatch):
    key = pipeline.register(tiny_topk(k=6))
    assert pipeline.materialize([sae, features], partition_key=key).success
    monkeypatch.setenv(ENV_BASE_URL, server.url)
    monkeypatch.setenv(ENV_MODEL, "fake-model")
    monkeypatch.setenv(ENV_API_KEY, KEY)
    run_config = {"ops": {"feature_labels": {"config": {"labeller": "llm"}}}}
    result = pipeline.materialize([feature_labels], partition_key=key, run_config=run_config)
    assert result.success
    (event,) = result.asset_materializations_for_node("feature_labels")
    metadata = {name: value.value for name, value in event.metadata.items()}
    table = pl.read_parquet(pipeline.layout.features_dir(key) / "features.parquet")
    live = set(table.filter(pl.col("is_live"))["latent_id"].to_list())
    assert (metadata["labeller"], metadata["n_labelled"]) == ("llm:fake-model", len(live))
    assert all(KEY not in str(event) for event in result.all_events)  # not in metadata, logs or run config
    assert KEY not in str(pipeline.instance.get_run_by_id(result.run_id).run_config)
    sent = server.labelling_requests()
    assert len(sent) == len(live) < len(table)  # one request per live latent, none for the others
    for request in server.requests:
        _check_request_hygiene(request)
    for request in sent:
        latent = int(re.search(r"^Latent (\d+) ", json.loads(request["body"])["messages"][1]["content"]).group(1))
        assert latent in live
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")
    assert labels["label"].to_list() == [LABEL] * len(live)
    scored = labels.filter(pl.col("detection_accuracy").is_not_null())
    # the fake answers "activating" for every context of a balanced set: accuracy 0.5, recall 1
    assert len(scored) > 0 and scored["detection_accuracy"].to_list() == [0.5] * len(scored)
    assert scored["detection_recall"].to_list() == [1.0] * len(scored)

    # a partition whose blocking checks failed is refused before any request is made
    blocked = "blocked_copy_of_" + key
    pipeline.instance.add_dynamic_partitions("sae_configs", [blocked])
    for source, target in ((pipeline.layout.sae_dir(key), pipeline.layout.sae_dir(blocked)),
                           (pipeline.layout.features_dir(key), pipeline.layout.features_dir(blocked))):
        shutil.copytree(source, target)
    quality.write_verdict(pipeline.layout.sae_dir(blocked), [quality.CheckOutcome(
        "sae_not_collapsed", False, "ERROR", "planted failure")])
    n_before = len(server.requests)
    refused = pipeline.materialize([feature_labels], partition_key=blocked, run_config=run_config)
    assert not refused.success and len(server.requests) == n_before
    assert not pipeline.layout.labels_dir(blocked).exists()
