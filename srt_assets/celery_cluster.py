"""srt on Celery: the app its workers run and the executor its runs use, built from one set of settings.

A worker (one per GPU; it also takes the CPU steps)::

    celery -A srt_assets.celery_cluster worker -Q gpu,dagster --concurrency 1 --hostname gpu-1@%h

``-Q`` takes one comma-separated list (Celery keeps only the last of several ``-Q``); a worker that
reads only ``gpu`` leaves the CPU steps, which go to ``dagster``, waiting for ever. The worker needs
the launching machine's environment: ``DAGSTER_HOME`` (an instance on PostgreSQL), ``SRT_STORAGE_DIR``
(a shared file system), the sources and models files, and the ``SRT_CELERY_*`` settings below.

Dagster's Celery executor waits for a step's result with no deadline. Celery acknowledges a task
when it starts, so a worker machine that dies mid-step leaves a run that waits for ever: this
executor asks the worker that started each step, every few seconds, whether it is alive, and fails
the step once it has not answered for ``$SRT_CELERY_LOST_AFTER_S``. A rerun then reuses every model
call the lost step had finished (they are in the cache). Prefetching is off, so a worker holds no
task it has not started: the tasks a dead worker took are exactly the ones it was running.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from celery.exceptions import DuplicateTaskNameWarning
from dagster import executor, multiple_process_executor_requirements
from dagster._core.execution.retries import RetryMode
from dagster._serdes import serialize_value
from dagster._utils.error import SerializableErrorInfo
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor, _submit_task
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
PING_TIMEOUT_S = 2.0


def celery_settings() -> dict[str, Any]:
    """The executor's configuration, which the workers' app shares: ``$SRT_CELERY_BROKER``,
    ``$SRT_CELERY_BACKEND`` (default: the broker, when it is Redis; else ``rpc://``)."""
    broker = os.environ.get("SRT_CELERY_BROKER") or DEFAULT_BROKER
    backend = os.environ.get("SRT_CELERY_BACKEND") or (broker if broker.startswith("redis") else "rpc://")
    return {
        "broker": broker,
        "backend": backend,
        "config_source": {
            "worker_disable_prefetch": True,  # take a task only with a free process (see above)
            "task_track_started": True,  # the result names the worker that started the step
            "broker_connection_retry_on_startup": True,
        },
    }


def lost_after_s() -> float:
    return float(os.environ.get("SRT_CELERY_LOST_AFTER_S", "60"))


class WatchedResult:
    """A step's Celery result that also becomes ready when the worker that started the step stops
    answering: the result of a task whose worker died never comes. Its events are then the step's
    failure (``lost``), which frees the step's pool slot and fails the run like any failed step."""

    def __init__(self, result, app, lost: Callable[[str], list], lost_after: float):
        self._result, self._app, self._lost, self.lost_after = result, app, lost, lost_after
        self._checked = time.monotonic()
        self._silent_since: float | None = None
        self.lost_worker: str | None = None

    def ready(self) -> bool:
        if self._result.ready():
            return True
        now = time.monotonic()
        if self.lost_worker is None and now - self._checked >= min(5.0, self.lost_after / 3):
            self._checked = now
            self._check_worker(now)
        return self.lost_worker is not None

    def _check_worker(self, now: float) -> None:
        info = self._result.info if self._result.state == "STARTED" else None
        worker = info.get("hostname") if isinstance(info, dict) else None
        if worker is None:  # still queued: no worker owns it yet
            return
        if self._app.control.ping(destination=[worker], timeout=PING_TIMEOUT_S):
            self._silent_since = None
            return
        self._silent_since = self._silent_since or now
        if now - self._silent_since >= self.lost_after:
            self.lost_worker = worker

    def get(self) -> list:
        if self.lost_worker is None:
            return self._result.get()
        return self._lost(
            f"Celery worker {self.lost_worker} stopped answering for {self.lost_after:.0f} s while it ran this "
            "step: it died or lost the broker. The model calls the step finished are cached; rerun the partition"
        )

    def revoke(self) -> None:
        self._result.revoke()


class WatchedCeleryExecutor(CeleryExecutor):
    """Dagster's Celery executor, with each step's worker watched (``WatchedResult``)."""

    def execute(self, plan_context, execution_plan):
        from dagster_celery.core_execution_loop import core_celery_execution_loop

        lost_after = lost_after_s()

        def submit(app, context, step, queue, priority, known_state):
            def lost(message: str) -> list:
                """The step's failure (or retry, under a retry policy), logged as the worker would have."""
                error = SerializableErrorInfo(message, stack=[], cls_name="WorkerLostError")
                return [
                    serialize_value(
                        self.log_failure_or_retry_event_after_error(context.for_step(step), error, known_state)
                    )
                ]

            with warnings.catch_warnings():  # dagster-celery registers its task anew for every step
                warnings.simplefilter("ignore", DuplicateTaskNameWarning)
                result = _submit_task(app, context, step, queue, priority, known_state)
            return WatchedResult(result, app, lost, lost_after)

        return core_celery_execution_loop(plan_context, execution_plan, step_execution_fn=submit)


@executor(name="celery", config_schema=CELERY_CONFIG, requirements=multiple_process_executor_requirements())
def srt_celery_executor(init_context):
    config = init_context.executor_config
    return WatchedCeleryExecutor(
        retries=RetryMode.from_config(config["retries"]),
        broker=config.get("broker"),
        backend=config.get("backend"),
        include=config.get("include"),
        config_source=config.get("config_source"),
    )


# What `celery -A srt_assets.celery_cluster worker` runs: Dagster's step task on srt's settings.
app = make_app(CeleryExecutor.for_cli(**celery_settings()).app_args())
execute_plan = create_task(app)
