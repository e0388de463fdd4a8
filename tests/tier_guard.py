"""The test tiers, enforced: ``make test-fast`` runs the tests without a tier marker, so an unmarked
test must not start a Dagster run, a server, a subprocess or a real model. This plugin makes each of
those fail an unmarked test at once, naming the marker it needs, and refuses at collection an
unmarked test that asks for a model fixture."""

from __future__ import annotations

import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TIER_MARKERS = ("integration", "slow")
MODEL_FIXTURES = {"student_model_dir", "student_tokenizer", "reference_scorer"}


def untiered(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(name) for name in TIER_MARKERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [
        item.nodeid for item in items if untiered(item) and MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if wrong:
        raise pytest.UsageError(
            "these tests use a real model but carry no @pytest.mark.slow: " + ", ".join(sorted(wrong))
        )


def _refusal(what: str, marker: str):
    def refuse(*args, **kwargs):
        ours = [f for f in traceback.extract_stack()[:-1] if _ours(f.filename) and f.filename != __file__]
        where = f" (at {Path(ours[-1].filename).relative_to(REPO_ROOT)}:{ours[-1].lineno})" if ours else ""
        pytest.fail(
            f"this test {what}{where} but carries no @pytest.mark.{marker}: mark it, so that make test-fast "
            "(unit tests only) leaves it out",
            pytrace=False,
        )

    return refuse


def _ours(filename: str) -> bool:
    return filename.startswith(str(REPO_ROOT)) and not filename.startswith(sys.prefix)


def _python_program(args) -> bool:
    """A subprocess that runs Python: the interpreter, or a script of this environment (dagster,
    srt, celery, accelerate). Small system tools (matplotlib's fc-list) are no tier's business."""
    argv = [args] if isinstance(args, str | bytes | Path) else list(args)
    program = str(argv[0]) if argv else ""
    return Path(program).name.startswith("python") or program.startswith((sys.prefix, sys.executable))


@pytest.fixture(autouse=True)
def _fast_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if not untiered(request.node):
        return
    from dagster import JobDefinition

    monkeypatch.setattr(JobDefinition, "execute_in_process", _refusal("starts a Dagster run", "integration"))
    monkeypatch.setattr(socket.socket, "listen", _refusal("starts a server", "integration"))
    refuse_python = _refusal("starts a Python subprocess", "integration")
    popen = subprocess.Popen.__init__

    def guarded_popen(self, args, *rest, **kwargs):
        if _python_program(args):
            refuse_python()
        popen(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    from transformers import PreTrainedModel  # once per session; every model load goes through it

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", _refusal("loads a real model", "slow"))
