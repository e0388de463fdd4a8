"""Secrets never become resource config: a base_url with credentials is refused where it is set."""

import pytest

from srt_assets.resources import ModelSettingsError, resources_from_file


@pytest.mark.parametrize(
    "url", ["http://user:CANARY-PASS@127.0.0.1:8765/v1", "http://127.0.0.1:8765/v1?api-key=CANARY-KEY"]
)
def test_a_base_url_with_credentials_is_refused_without_echoing_it(tmp_path, url):
    models = tmp_path / "models.yaml"
    models.write_text(f"teacher:\n  backend: openai\n  model: m\n  base_url: {url}\n", encoding="utf-8")
    with pytest.raises(ModelSettingsError, match="api_key_env") as refused:
        resources_from_file(models)
    assert "CANARY" not in str(refused.value)
