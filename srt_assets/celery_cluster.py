"""srt on Celery: the app its workers run and the executor its runs use, built from one set of settings.

A worker (one per GPU, each with its own device and a name unique in the cluster; it also takes the
CPU steps)::

    CUDA_VISIBLE_DEVICES=0 celery -A srt_assets.celery_cluster worker -Q gpu,dagster --concurrency 1 --hostname gpu-0@%h

``-Q`` takes one comma-separated list (Celery keeps only the last of several ``-Q``); a worker that
reads only ``gpu`` leaves the CPU steps, which go to ``dagster``, waiting for ever. The worker needs
the launching machine's environment: ``DAGSTER_HOME`` (an instance on PostgreSQL), ``SRT_STORAGE_DIR``
(a shared file system), the sources and models files, and the ``SRT_CELERY_*`` settings below.

Dagster's Celery executor waits for a step's result with no deadline. Celery acknowledges a task
when it starts, so a worker machine that dies mid-step leaves a run that waits for ever: this
executor asks the worker that started each step, every few seconds, whether it is alive, and fails
the step once it has not answered for ``$SRT_CELERY_LOST_AFTER_S`` (a broker outage as long fails it
too; a shorter one is waited out). A rerun then reuses every model call the lost step had finished
(they are in the cache). The broker must be Redis: prefetching is off (``worker_disable_prefetch``,
which Celery honours on Redis only), so a worker holds no task it has not started and the tasks a
dead worker took are exactly the ones it was running.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from celery.exceptions import DuplicateTaskNameWarning, TaskRevokedError
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
    """The executor's configuration, which the workers' app shares: ``$SRT_CELERY_BROKER`` (Redis),
    ``$SRT_CELERY_BACKEND`` (default: the broker)."""
    broker = os.environ.get("SRT_CELERY_BROKER") or DEFAULT_BROKER
    if not broker.startswith(("redis://", "rediss://")):
        raise ValueError("SRT_CELERY_BROKER must be a redis:// URL: srt's workers rely on Redis to take no task early")
    backend = os.environ.get("SRT_CELERY_BACKEND") or broker
    return {
        "broker": broker,
        "backend": backend,
        "config_source": {
            "worker_disable_prefetch": True,  # take a task only with a free process (see above)
            "task_track_started": True,  # the result names the worker that started the step
            "broker_connection_retry_on_startup": True,
            # a fresh process per step: it reads the current catalog and settings, and a step's model
            # (and its GPU memory) leaves with its process
            "worker_max_tasks_per_child": 1,
        },
    }


def lost_after_s() -> float:
    return float(os.environ.get("SRT_CELERY_LOST_AFTER_S", "60"))


class WatchedResult:
    """A step's Celery result that also becomes ready when the step can no longer report: the worker
    that started it stopped answering, its result was lost (the backend restarted empty) while the
    worker no longer runs it, or the backend stayed unreadable, each for ``lost_after`` seconds. A
    shorter outage is waited out. Its events are then the step's failure (``lost``), which frees the
    step's pool slot and fails the run like any failed step (or retries it, under a retry policy)."""

    def __init__(self, result, app, lost: Callable[[str], list], lost_after: float):
        self._result, self._app, self._lost, self.lost_after = result, app, lost, lost_after
        self._checked = time.monotonic()
        self._trouble_since: float | None = None
        self.worker: str | None = None  # the worker that started the step, once known
        self.lost_reason: str | None = None

    def ready(self) -> bool:
        if self.lost_reason is not None:
            return True
        try:
            if self._result.ready():
                return True
        except Exception as exc:  # the broker (and its result backend) is away: wait for it a while
            return self._trouble(f"the Celery result backend could not be read ({type(exc).__name__})")
        if time.monotonic() - self._checked < min(5.0, self.lost_after / 3):
            return False
        self._checked = time.monotonic()
        try:
            return self._check_worker()
        except Exception as exc:
            return self._trouble(f"the Celery broker could not be reached ({type(exc).__name__})")

    def _trouble(self, reason: str) -> bool:
        now = time.monotonic()
        self._trouble_since = self._trouble_since or now
        if now - self._trouble_since >= self.lost_after:
            self.lost_reason = f"{reason}, for {self.lost_after:.0f} s"
        return self.lost_reason is not None

    def _check_worker(self) -> bool:
        state, info = self._result.state, self._result.info
        if state == "STARTED" and isinstance(info, dict):
            self.worker = info.get("hostname") or self.worker
        if self.worker is None:  # still queued: no worker owns it yet
            self._trouble_since = None
            return False
        if not self._app.control.ping(destination=[self.worker], timeout=PING_TIMEOUT_S):
            return self._trouble(f"Celery worker {self.worker} stopped answering while it ran this step")
        if state != "STARTED" and not self._worker_runs_it():  # started, then its result vanished
            return self._trouble(f"Celery worker {self.worker} no longer runs this step and its result was lost")
        self._trouble_since = None
        return False

    def _worker_runs_it(self) -> bool:
        active = self._app.control.inspect([self.worker], timeout=PING_TIMEOUT_S).active() or {}
        return any(task.get("id") == self._result.id for tasks in active.values() for task in tasks)

    def get(self) -> list:
        if self.lost_reason is not None:
            return self._lost(f"{self.lost_reason}. The model calls the step finished are cached; rerun the partition")
        try:
            return self._result.get()
        except TaskRevokedError:
            raise  # the run was stopped: Dagster's loop reports it
        except Exception as exc:  # the task died before it could report (its pool process was killed)
            return self._lost(f"the step's Celery task ended without reporting: {type(exc).__name__}: {exc}")

    def revoke(self) -> None:
        """The run is being stopped: stop the step where it runs, not only its queued task."""
        self._result.revoke(terminate=True, signal="SIGTERM")


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
