"""The fast tier stays fast: an unmarked test that starts a Dagster run, a server, a Python
subprocess or a model fails at once, naming the marker it needs (tests/tier_guard.py)."""

import socket
import subprocess
import sys

import pytest


def test_an_unmarked_test_cannot_start_a_dagster_run():
    from dagster import asset, materialize

    @asset
    def one() -> int:
        return 1

    with pytest.raises(pytest.fail.Exception, match=r"starts a Dagster run .*pytest\.mark\.integration"):
        materialize([one])


def test_an_unmarked_test_cannot_start_a_server():
    with socket.socket() as server, pytest.raises(pytest.fail.Exception, match="starts a server"):
        server.bind(("127.0.0.1", 0))
        server.listen()


def test_an_unmarked_test_cannot_start_a_python_subprocess_but_may_run_a_system_tool():
    with pytest.raises(pytest.fail.Exception, match="starts a Python subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert subprocess.run(["true"], check=False).returncode == 0


def test_an_unmarked_test_cannot_load_a_model():
    from transformers import LlamaForCausalLM

    with pytest.raises(pytest.fail.Exception, match=r"loads a real model .*pytest\.mark\.slow"):
        LlamaForCausalLM.from_pretrained("/nonexistent")


@pytest.mark.integration
def test_a_marked_test_may_start_a_python_subprocess():
    done = subprocess.run([sys.executable, "-c", "print('ran')"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "ran"


def test_an_unmarked_test_asking_for_a_model_fixture_is_refused_at_collection(pytester):
    pytester.makeconftest(
        "import pytest\npytest_plugins = ['tier_guard']\n"
        "@pytest.fixture\ndef student_model_dir(tmp_path):\n    return tmp_path\n"
    )
    pytester.makepyfile(
        "import pytest\n"
        "def test_unmarked(student_model_dir):\n    pass\n"
        "@pytest.mark.slow\ndef test_marked(student_model_dir):\n    pass\n"
    )
    pytester.syspathinsert(str(pytester.path))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*use a real model but carry no @pytest.mark.slow*test_unmarked*"])
    assert "test_marked" not in "".join(line for line in result.stderr.lines if "carry no" in line)
    assert result.ret != 0
