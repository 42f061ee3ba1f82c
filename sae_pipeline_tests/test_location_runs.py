"""Runs started by `sae-pipeline run-sweep` are runs of the code location: the web UI files them under their jobs,
places them on the timeline by code location, and re-executes them."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from sae_pipeline.defs.runs import LOCATION_NAME, PID_TAG
from sae_pipeline_tests import webui
from sae_pipeline_tests.conftest import Pipeline

JOB_RUNS = """
query ($job: String!, $location: String!) {
  pipelineOrError(params: {pipelineName: $job, repositoryName: "__repository__", repositoryLocationName: $location}) {
    ... on Pipeline { runs { runId } }
    ... on PythonError { message }
  }
}
"""
ALL_RUNS = """
{ runsOrError { ... on Runs { results { runId pipelineName tags { key value }
    repositoryOrigin { repositoryLocationName repositoryName } } } } }
"""
LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"
REEXECUTE = """
mutation ($parent: String!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $parent, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId pipelineName repositoryOrigin { repositoryLocationName } } }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
  }
}
"""


def _data(port: int, query: str, variables: dict | None = None) -> dict:
    answer = webui.graphql(port, query, variables)
    assert "errors" not in answer, answer
    return answer["data"]


def _runs(home: Path, job: str | None = None) -> set[str]:
    """The runs the CLI started (they carry its pid tag), of `job` or of every job."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return {run.run_id for run in instance.get_runs(filters=dg.RunsFilter(job_name=job)) if PID_TAG in run.tags}


def test_cli_runs_are_listed_on_their_job_pages_and_timeline(ui_home: webui.UIHome) -> None:
    cli_runs = {job: _runs(ui_home.home, job) for job in ("train_sweep", "analyze_sweep")}
    assert len(cli_runs["train_sweep"]) == 3 and len(cli_runs["analyze_sweep"]) == 1  # 1 ranged sae + 2 downstream
    locations = _data(ui_home.port, LOCATIONS)["workspaceOrError"]["locationEntries"]
    assert [entry["name"] for entry in locations] == [LOCATION_NAME]
    for job, run_ids in cli_runs.items():
        page = _data(ui_home.port, JOB_RUNS, {"job": job, "location": LOCATION_NAME})["pipelineOrError"]
        assert {run["runId"] for run in page["runs"]} == run_ids, (job, page)
    shown = {run["runId"]: run for run in _data(ui_home.port, ALL_RUNS)["runsOrError"]["results"]}
    assert set(shown) >= _runs(ui_home.home)
    for run in (shown[run_id] for run_id in _runs(ui_home.home)):  # what the timeline groups runs by
        assert run["repositoryOrigin"] == {"repositoryLocationName": LOCATION_NAME,
                                           "repositoryName": "__repository__"}, run
        assert {"key": "dagster/code_location", "value": LOCATION_NAME} in run["tags"], run


def test_a_cli_run_is_reexecuted_from_the_ui(pipeline: Pipeline, tmp_path: Path) -> None:
    """Re-execution (a run retry) from the UI takes the CLI run as its parent; on its own home, since it leaves
    a queued run behind."""
    env, _ = webui.materialise_home(pipeline.root, tmp_path)
    (analysis,) = _runs(Path(env["DAGSTER_HOME"]), "analyze_sweep")
    with webui.webserver(env, tmp_path / "webserver.log") as port:
        launched = _data(port, REEXECUTE, {"parent": analysis})["launchRunReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert launched["run"]["pipelineName"] == "analyze_sweep"
    assert launched["run"]["repositoryOrigin"] == {"repositoryLocationName": LOCATION_NAME}
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        child = instance.get_run_by_id(launched["run"]["runId"])
        assert child is not None and child.parent_run_id == analysis
