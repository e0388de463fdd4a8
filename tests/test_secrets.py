"""Secrets never become resource config: a base_url with credentials is refused where it is set; a
path anyone can type in the launchpad (prompts_file) never shows what the file it names holds."""

import json
import os
import re
import uuid

import pytest

from srt_assets.settings_file import ModelSettingsError, resources_from_file


@pytest.mark.parametrize(
    "url",
    [
        "http://user:CANARY-PASS@127.0.0.1:8765/v1",
        "http://127.0.0.1:8765/v1?api-key=CANARY-KEY",
        "http://u:pa,ssCANARY@127.0.0.1:8765/v1",  # the comma split it into two "replicas" without userinfo
        "http://127.0.0.1:8765/v1;api-key=CANARY",
        "http://127.0.0.1:8765/v1#CANARY",
    ],
)
def test_a_base_url_with_credentials_is_refused_without_echoing_it(tmp_path, url):
    models = tmp_path / "models.yaml"
    models.write_text(f"teacher:\n  backend: openai\n  model: m\n  base_url: {url}\n", encoding="utf-8")
    with pytest.raises(ModelSettingsError, match="api_key_env") as refused:
        resources_from_file(models)
    assert "CANARY" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("passwd", "root:x:0:0:CANARY-ROOT:/root:/bin/bash\n", "must be a .yaml or .yml file"),
        ("notes.yaml", "root:x:0:0:CANARY-ROOT:/root:/bin/bash\n", "not a mapping of prompt keys"),
        ("keys.yaml", "CANARY_DB_PASSWORD: x\nCANARY_TOKEN: y\n", "2 unknown key(s); allowed"),
        ("tabs.yaml", "a: CANARY-1\n\tb: CANARY-2\n", "not UTF-8 YAML (line 2)"),
        ("list.yaml", "- CANARY-ITEM\n", "not a mapping of prompt keys"),
    ],
)
def test_a_prompts_file_error_never_repeats_the_file(tmp_path, name, text, reason):
    """The old error listed a plain file's characters, or a YAML file's top-level keys."""
    from srt_assets.core.reflection import ReflectionPrompts

    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:
        ReflectionPrompts.from_file(tmp_path / name)
    assert "CANARY" not in str(refused.value)


def test_a_prompts_file_that_is_no_regular_file_or_too_deep_fails_at_once(tmp_path):
    """A FIFO named prompts.yaml hung the loader for ever; YAML nested 50,000 deep raised a bare
    RecursionError naming nothing."""
    from srt_assets.core.reflection import ReflectionPrompts

    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ValueError, match=r"fifo\.yaml'?: not a regular file"):
        ReflectionPrompts.from_file(tmp_path / "fifo.yaml")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 50_000 + "]" * 50_000, encoding="utf-8")
    with pytest.raises(ValueError, match=r"deep\.yaml'?: nested too deeply"):
        ReflectionPrompts.from_file(tmp_path / "deep.yaml")


def test_a_misspelt_prompt_key_is_named_with_its_fix(tmp_path):
    from srt_assets.core.reflection import ReflectionPrompts

    (tmp_path / "p.yaml").write_text("instruction_sytem: Be brief.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'instruction_sytem' \\(did you mean 'instruction_system'\\?\\)"):
        ReflectionPrompts.from_file(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("instruction_system: Be brief.\n", encoding="utf-8")
    assert ReflectionPrompts.from_file(tmp_path / "p.yaml").instruction_system == "Be brief."


RESOURCES = """{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
  ... on RepositoryLocation { repositories { allTopLevelResourceDetails { name
    configFields { name } configuredValues { key value type } } } } } } } } }"""
SCAFFOLD = """{ runConfigSchemaOrError(selector: {repositoryLocationName: "srt_assets",
  repositoryName: "__repository__", pipelineName: "__ASSET_JOB"}) {
  ... on RunConfigSchema { rootDefaultYaml } ... on PythonError { message } } }"""
STORED_RUNS = """{ runsOrError { ... on Runs { results { runId status runConfigYaml tags { key value } } } } }"""
EVENT_LOG = """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
  ... on MessageEvent { message } ... on MaterializationEvent { metadataEntries { label
    ... on TextMetadataEntry { text } ... on MarkdownMetadataEntry { mdStr } ... on JsonMetadataEntry { jsonString }
    ... on UrlMetadataEntry { url } } } } } } }"""


@pytest.mark.integration
def test_the_teacher_key_reaches_the_endpoint_and_no_ui_viewer(tmp_path):
    """The key lives in the environment: the teacher sends it, and nothing the webserver's GraphQL
    serves (resources, the launchpad scaffold, stored run config, run logs and metadata) holds it; a
    literal key in a launched run's config is refused."""
    from conftest import alpaca_rows, write_jsonl
    from dagster_ui import LAUNCH, dagster_dev, graphql, run_partition, wait_for_location
    from openai_server import ScriptedOpenAIServer

    canary = f"sk-CANARY-{uuid.uuid4().hex}"
    write_jsonl(tmp_path / "tiny.jsonl", alpaca_rows(3))
    catalog = tmp_path / "sources.yaml"
    catalog.write_text("sources:\n  tiny:\n    path: tiny.jsonl\n", encoding="utf-8")
    with ScriptedOpenAIServer(api_key=canary) as server:
        models = tmp_path / "models.yaml"
        models.write_text(f"teacher:\n  backend: openai\n  model: scripted\n  base_url: {server.base_url}\n")
        env = {"SRT_SOURCES_FILE": str(catalog), "SRT_MODELS_FILE": str(models), "SRT_TEACHER_API_KEY": canary}
        with dagster_dev(tmp_path, **env) as port:
            assert wait_for_location(port)["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            assert run_partition(port, "tiny", ["raw_samples", "raw_rejects", "new_instructions"]) == "SUCCESS"
            assert server.requests >= 3 and server.authorization == {f"Bearer {canary}"}  # the key was used
            served = [graphql(port, query) for query in (RESOURCES, SCAFFOLD, STORED_RUNS)]
            runs = served[-1]["data"]["runsOrError"]["results"]
            served += [graphql(port, EVENT_LOG, {"id": run["runId"]}) for run in runs]
            params = {
                "selector": {
                    "repositoryLocationName": "srt_assets",
                    "repositoryName": "__repository__",
                    "jobName": "__ASSET_JOB",
                    "assetSelection": [{"path": ["new_instructions"]}],
                },
                "runConfigData": {"resources": {"teacher": {"config": {"api_key": canary}}}},
                "mode": "default",
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "tiny"}]},
            }
            refused = graphql(port, LAUNCH, {"params": params})["data"]["launchRun"]
            after = graphql(port, STORED_RUNS)
    resources = json.dumps(served[0])
    assert "teacher" in resources and server.base_url in resources  # the teacher's config is served
    assert "rootDefaultYaml" in json.dumps(served[1]) and len(runs) == 1
    assert canary not in json.dumps(served), "the key reached the UI"
    assert refused["__typename"] == "RunConfigValidationInvalid" and "api_key" in json.dumps(refused)
    assert canary not in json.dumps(after) and len(after["data"]["runsOrError"]["results"]) == 1


@pytest.mark.parametrize(
    "url", ["postgresql://srt:CANARY-7Q@db/srt", "postgresql://srt@db/srt?password=CANARY-7Q", "srt:CANARY-7Q@db"]
)
def test_a_refused_cache_url_is_never_quoted_in_the_error(url):
    """The error reaches stdout and the event log: it names the rule, not the URL with its password."""
    from srt_assets.resources import StorageResource

    with pytest.raises(Exception, match="SRT_CACHE_URL") as refused:
        StorageResource(cache_url=url)
    assert "CANARY" not in str(refused.value)
