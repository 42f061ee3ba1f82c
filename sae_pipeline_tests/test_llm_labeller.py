"""The LLM labeller and scorer against a fake OpenAI-compatible server on 127.0.0.1 that records each request."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline import quality
from sae_pipeline.defs.assets import feature_labels, features, sae
from sae_pipeline.defs.stops import LABELS_RETRY_POLICY
from sae_pipeline.labelling import (
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_MODEL,
    ChatClient,
    LLMError,
    LLMLabeller,
    label_features,
)
from sae_pipeline.scoring import FUZZING_SYSTEM_PROMPT, Highlighted, LLMScorer
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline, tiny_topk
from sae_pipeline_tests.test_labelling import DEAD, NEAR_ZERO, PLANTED
from sae_pipeline_tests.test_labelling import features as features_table  # noqa: F401  (fixture)

KEY = "sk-test-SECRET-0123456789"
LABEL = "the word import"


class FakeServer:
    """Answers labelling prompts with LABEL and detection prompts with all-ones; keeps every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        """Statuses to answer the next requests with (one each, in order) before answering normally."""
        self.labels_before_failing: int | None = None
        """Answer labelling prompts with HTTP 400 once this many have been answered normally."""
        self.label_statuses: dict[int, int] = {}
        """Labelling request number (1-based) -> the status it is answered with instead of a label."""
        self.on_label: Callable[[int], None] | None = None
        """Called with the labelling request number before each labelling prompt is answered."""
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                messages = json.loads(body)["messages"]
                scoring = messages[1]["content"].startswith("Explanation:")
                n_labels = len(recorder.labelling_requests())
                if not scoring and recorder.on_label is not None:
                    recorder.on_label(n_labels)
                if not scoring and n_labels in recorder.label_statuses:
                    self.send_error(recorder.label_statuses[n_labels])
                    return
                if recorder.statuses or (not scoring and recorder.labels_before_failing is not None
                                         and n_labels > recorder.labels_before_failing):
                    self.send_error(recorder.statuses.pop(0) if recorder.statuses else 400)
                    return
                if scoring:  # a detection (scoring) prompt
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


@pytest.fixture
def fast_retries(monkeypatch):
    """feature_labels' retry policy with its 30 s base delay made 10 ms, so that a test sees whether it retries."""
    fast = dg.RetryPolicy(max_retries=LABELS_RETRY_POLICY.max_retries, delay=0.01,
                          backoff=LABELS_RETRY_POLICY.backoff)
    monkeypatch.setattr(feature_labels.op, "_retry_policy", fast)
    return fast


def _retries(result: dg.ExecuteInProcessResult) -> int:
    return sum(event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for event in result.all_events)


def _llm_env(monkeypatch, server: FakeServer) -> None:
    for name, value in ((ENV_BASE_URL, server.url), (ENV_MODEL, "fake-model"), (ENV_API_KEY, KEY)):
        monkeypatch.setenv(name, value)


def _trained_partition(pipeline: Pipeline) -> str:
    key = pipeline.register(tiny_topk(k=6))  # the partition these tests label: trained once per session
    if not (pipeline.layout.features_dir(key) / "features.parquet").exists():
        assert pipeline.materialize([sae, features], partition_key=key).success
    return key


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
    highlighted = [Highlighted(["we", "import", "x"], [False, True, False], True),
                   Highlighted(["we", "import", "x"], [True, False, False], False)]
    assert scorer.judge_highlights("'import'", highlighted) == [True, True]
    sent = json.loads(server.requests[-1]["body"])["messages"]
    assert sent[0]["content"] == FUZZING_SYSTEM_PROMPT
    assert sent[1]["content"].splitlines()[2:] == ["Example 1: we <<import>> x", "Example 2: <<we>> import x"]
    _check_request_hygiene(server.requests[-1])
    broken = ChatClient("http://127.0.0.1:9/v1", "fake-model", KEY, timeout=2, retries=0)
    with pytest.raises(LLMError) as error:
        broken.complete([{"role": "user", "content": "hi"}])
    assert KEY not in str(error.value)
    with pytest.raises(LLMError, match=ENV_BASE_URL):
        ChatClient.from_env({ENV_API_KEY: KEY})


def test_feature_labels_with_the_llm_through_dagster(pipeline: Pipeline, server, monkeypatch, fast_retries):
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
    assert _retries(refused) == 0  # a refusal is final: the retry policy does not apply


PROMPT = [{"role": "system", "content": "You label latents."}, {"role": "user", "content": "Latent 1: import"}]


def test_transient_failures_are_retried_with_backoff_and_others_are_not(server):
    server.statuses = [503, 429]
    client = ChatClient(server.url, "fake-model", KEY, retries=2, backoff=0.05)
    started = time.monotonic()
    assert client.complete(PROMPT) == LABEL
    assert len(server.requests) == 3 and time.monotonic() - started >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s
    server.statuses = [503, 503]
    with pytest.raises(LLMError, match="failed 2 time"):
        ChatClient(server.url, "fake-model", KEY, retries=1, backoff=0.01).complete(PROMPT)
    n_before = len(server.requests)
    server.statuses = [400]
    with pytest.raises(LLMError, match="HTTP 400") as error:
        client.complete(PROMPT)
    assert len(server.requests) == n_before + 1 and KEY not in str(error.value)  # a client error is not retried


@pytest.fixture
def dripping_server():
    """Answers every request one byte every 0.2 s, status line included (a stalled proxy or overloaded host)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_a_dripping_server_is_cut_off_per_request_and_per_step(dripping_server):
    message = PROMPT
    started = time.monotonic()
    with pytest.raises(LLMError, match="no complete answer within 0.5 s"):
        ChatClient(dripping_server, "fake-model", KEY, timeout=0.5, retries=0).complete(message)
    assert time.monotonic() - started < 1.5  # the socket timeout alone would never fire: a byte comes every 0.2 s
    patient = ChatClient(dripping_server, "fake-model", KEY, timeout=0.5, retries=10, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(LLMError):
        patient.with_deadline(1.2).complete(message)
    assert time.monotonic() - started < 2.0  # 11 attempts of 0.5 s would take 5.5 s: the step deadline ends it


def test_labels_obtained_before_a_failure_are_kept_and_resumed(pipeline: Pipeline, server, monkeypatch,
                                                               fast_retries):
    key = _trained_partition(pipeline)
    _llm_env(monkeypatch, server)
    n_live = 10
    run_config = {"ops": {"feature_labels": {"config": {"labeller": "llm", "retries": 0, "max_latents": n_live}}}}
    assert int(pl.read_parquet(pipeline.layout.features_dir(key) / "features.parquet")["is_live"].sum()) > n_live
    server.labels_before_failing = 3
    failed = pipeline.materialize([feature_labels], partition_key=key, run_config=run_config)
    assert not failed.success
    message = "\n".join(e.step_failure_data.error.message for e in failed.all_events if e.is_step_failure)
    assert "HTTP 400" in message and "3 label(s) kept" in message and KEY not in message
    assert _retries(failed) == 0  # a client error would fail the same way again: not retried
    server.labels_before_failing, n_before = None, len(server.labelling_requests())
    resumed = pipeline.materialize([feature_labels], partition_key=key, run_config=run_config)
    assert resumed.success
    assert len(server.labelling_requests()) - n_before == n_live - 3  # only the latents not labelled before
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")
    assert labels.height == n_live and labels["label"].to_list() == [LABEL] * n_live
    assert not pipeline.layout.labels_progress_dir(key).exists()


def test_retry_policy_backs_off_exponentially() -> None:
    assert feature_labels.op.retry_policy is LABELS_RETRY_POLICY
    assert [LABELS_RETRY_POLICY.calculate_delay(attempt) for attempt in (1, 2, 3)] == [30, 90, 210]


def test_an_unavailable_endpoint_is_retried_by_dagster_and_resumes(pipeline: Pipeline, server, monkeypatch,
                                                                    fast_retries):
    key = _trained_partition(pipeline)
    _llm_env(monkeypatch, server)
    n_live = 6
    run_config = {"ops": {"feature_labels": {"config": {"labeller": "llm", "retries": 0, "max_latents": n_live}}}}
    server.label_statuses = {3: 503, 4: 503}  # the 3rd label fails, and so does the first try of the retry
    result = pipeline.materialize([feature_labels], partition_key=key, run_config=run_config)
    assert result.success and _retries(result) == 2
    labels_asked = [int(re.search(r"^Latent (\d+) ", json.loads(r["body"])["messages"][1]["content"]).group(1))
                    for r in server.labelling_requests()]
    # attempt 1 labels two latents and fails on the third; attempts 2 and 3 ask only for the rest
    assert len(labels_asked) == n_live + 2 and labels_asked[2] == labels_asked[3] == labels_asked[4]
    assert len(set(labels_asked)) == n_live
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")
    assert sorted(labels["latent_id"].to_list()) == sorted(set(labels_asked))


def test_a_ranged_labels_retry_skips_the_partitions_already_labelled(pipeline: Pipeline, server, monkeypatch,
                                                                      fast_retries):
    keys = [pipeline.register(tiny_topk(k=k, lr=1.7e-3, train_tokens=256 * 20)) for k in (5, 7)]
    for key in keys:
        assert pipeline.materialize([sae, features], partition_key=key).success
    _llm_env(monkeypatch, server)
    n_live = 3
    run_config = {"ops": {"feature_labels": {"config": {"labeller": "llm", "retries": 0, "max_latents": n_live}}}}
    server.label_statuses = {n_live + 1: 503}  # the second partition's first label fails
    result = dg.materialize(ALL_ASSETS, selection=[feature_labels], instance=pipeline.instance,
                            resources=pipeline.resources(), run_config=run_config, raise_on_error=False,
                            tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[1]})
    assert result.success and _retries(result) == 1
    # attempt 1: the first partition's labels, then one failed request; the retry asks only for the second's
    assert len(server.labelling_requests()) == n_live + 1 + n_live
    for key in keys:
        records = pipeline.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("feature_labels"), asset_partitions=[key]), limit=5).records
        assert [r.run_id for r in records].count(result.run_id) == 1
        assert len(pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")) == n_live


def test_a_stop_during_labelling_is_not_retried(pipeline: Pipeline, server, monkeypatch, fast_retries):
    key = _trained_partition(pipeline)
    _llm_env(monkeypatch, server)
    server.on_label = lambda n: os.kill(os.getpid(), signal.SIGINT) if n == 2 else None  # Ctrl-C mid-step
    run_config = {"ops": {"feature_labels": {"config": {"labeller": "llm", "retries": 0, "max_latents": 6}}}}
    result = pipeline.materialize([feature_labels], partition_key=key, run_config=run_config)
    assert not result.success and _retries(result) == 0
    message = "\n".join(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)
    assert f"feature_labels for partition {key} was stopped" in message
    assert len(server.labelling_requests()) == 2  # it stopped there, and no retry asked again
    assert f"kept: 1 label(s) of {key} obtained so far" in message  # the answer to the first request
    server.on_label = None
    assert pipeline.materialize([feature_labels], partition_key=key, run_config=run_config).success
    assert len(server.labelling_requests()) == 2 + 5  # the rerun asks only for the other five
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")
    assert labels.height == 6 and labels["latent_id"].n_unique() == 6


def test_requests_go_through_the_environments_proxy(server, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", server.url.removesuffix("/v1"))  # the fake server plays the proxy
    client = ChatClient("http://llm.example.invalid/v1", "fake-model", KEY, retries=0)
    assert client.complete(PROMPT) == LABEL
    assert server.requests[-1]["path"] == "http://llm.example.invalid/v1/chat/completions"
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_step_timeout_is_a_deadline_for_the_whole_step_across_retries(pipeline: Pipeline, dripping_server,
                                                                      monkeypatch, fast_retries):
    """A hanging endpoint: each attempt's request times out (transient), and the retries stop at the deadline
    counted from the first attempt, instead of each retry getting a fresh step_timeout."""
    key = _trained_partition(pipeline)
    monkeypatch.setenv("SAE_PIPELINE_LLM_BASE_URL", dripping_server)
    monkeypatch.setenv("SAE_PIPELINE_LLM_MODEL", "fake-model")
    monkeypatch.setenv("SAE_PIPELINE_LLM_API_KEY", KEY)
    step_timeout = 2.5
    run_config = {"ops": {"feature_labels": {"config": {
        "labeller": "llm", "retries": 0, "max_latents": 4, "request_timeout": 1.0, "step_timeout": step_timeout}}}}
    started = time.monotonic()
    result = pipeline.materialize([feature_labels], partition_key=key, run_config=run_config)
    elapsed = time.monotonic() - started
    assert not result.success
    assert _retries(result) < LABELS_RETRY_POLICY.max_retries  # a fresh deadline per attempt would retry 3 times
    message = "\n".join(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)
    assert f"step_timeout {step_timeout:g} s" in message and "label(s) kept" in message, message
    assert elapsed < step_timeout + 20  # the step's start-up (loading the partition) included
