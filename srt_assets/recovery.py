"""Keeping an instance from wedging: a run whose process died (``kill -9``, a lost machine) keeps its
claims on the ``gpu`` pool, and every later model step would wait for them forever. Dagster's run
monitoring cannot see a dead local run worker (the default launcher has no health check), so srt
looks for itself: a run still marked started whose process is gone on this machine is marked
failed and its pool slots are freed. ``srt materialize`` does this before it runs (and frees what
its own ended run still claims after), and the ``free_dead_runs`` sensor every half minute under
``dagster dev``."""

import os
import socket
import sys
import threading

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultRunLauncher,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

HOST_TAG = "srt/host"  # where a CLI run's process lives; runs without it were launched by this instance's daemon


def this_host() -> str:
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine; a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()  # noqa: SIM115
    except OSError:
        return True  # no /proc here: trust the signal check
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def run_process(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid of the process that started the run (its RUN_START event records it)."""
    records = instance.all_logs(run_id, of_type=DagsterEventType.RUN_START)
    pids = [r.dagster_event.pid for r in records if r.dagster_event and r.dagster_event.pid]
    return pids[-1] if pids else None


def judged_here(instance: DagsterInstance, tags: dict) -> bool:
    """Only runs whose process lives on this machine can be judged by looking for it: CLI runs that
    name this host, and runs without a host tag (launched from the UI) only on an instance that
    cannot be shared between machines (SQLite storage) with the local launcher."""
    if HOST_TAG in tags:
        return tags[HOST_TAG] == this_host()
    local_storage = type(instance.run_storage).__name__.startswith(("Sqlite", "InMemory"))
    return local_storage and isinstance(instance.run_launcher, DefaultRunLauncher)


def free_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark started runs whose process is gone as failed and free their pool slots; returns what
    was done, one line per run."""
    done = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED]), limit=200):
        run = record.dagster_run
        if not judged_here(instance, dict(run.tags)):
            continue
        pid = run_process(instance, run.run_id)
        if pid is None or process_alive(pid):
            continue
        held = slots_held(instance, run.run_id)
        message = f"run {run.run_id}: its process {pid} is gone (killed?); marked failed"
        instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)  # (a failed run may free them too)
        done.append(f"{message}, {held} pool slot(s) freed; rerun it to resume from the cache")
    return done


def free_slots_of_ended_runs(instance: DagsterInstance, run_ids: list[str] | None = None) -> list[str]:
    """Free the slots still claimed by runs that have ended (of ``run_ids``, or any). A run frees a
    step's slot when the step reports its end; a run whose executor gave up without that report
    would hold the slot for ever. Dagster's daemon does this after ``free_slots_after_run_end_seconds``;
    ``srt materialize`` runs without the daemon, and calls this for its own run once it has ended."""
    storage = instance.event_log_storage
    claimed = {
        slot.run_id
        for pool in storage.get_concurrency_keys()
        for slot in storage.get_concurrency_info(pool).claimed_slots
    }
    done = []
    for run_id in sorted(claimed if run_ids is None else claimed & set(run_ids)):
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            continue
        held = slots_held(instance, run_id)
        storage.free_concurrency_slots_for_run(run_id)
        done.append(f"run {run_id} ended with {held} pool slot(s) still claimed by steps that never reported back "
                    "(a lost worker or broker); freed")  # fmt: skip
    return done


def slots_held(instance: DagsterInstance, run_id: str) -> int:
    storage = instance.event_log_storage
    return sum(
        slot.run_id == run_id
        for pool in storage.get_concurrency_keys()
        for slot in storage.get_concurrency_info(pool).claimed_slots
    )


def pool_holders(instance: DagsterInstance, pool: str) -> list[str]:
    """Who holds the slots of ``pool`` right now, as 'run <id> step <key>' lines."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    return [f"run {slot.run_id} step {slot.step_key}" for slot in info.claimed_slots]


@sensor(
    name="free_dead_runs",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Frees the pool slots of runs whose process died (a killed run would otherwise hold the "
    "gpu pool forever) and marks those runs failed. Launches nothing.",
)
def free_dead_runs_sensor(context: SensorEvaluationContext):
    done = free_dead_runs(context.instance)
    for line in done:
        context.log.warning(line)
    return SkipReason("; ".join(done) if done else "no dead run holds a slot")


class PoolWatcher:
    """While a run executes, say once when one of its steps waits for a slot of a pool, and who
    holds the slots (Dagster notes it only at debug level, so a waiting run looked hung)."""

    def __init__(self, instance: DagsterInstance, run_id: str, interval_s: float = 5.0):
        self.instance, self.run_id, self.interval_s = instance, run_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self.reported: set[str] = set()

    def _watch(self) -> None:
        storage = self.instance.event_log_storage
        while not self._stop.wait(self.interval_s):
            try:
                for pool in storage.get_concurrency_keys():
                    info = storage.get_concurrency_info(pool)
                    for pending in info.pending_steps:
                        step = pending.step_key
                        if pending.run_id != self.run_id or pending.assigned_timestamp or step in self.reported:
                            continue
                        self.reported.add(step)
                        holders = ", ".join(pool_holders(self.instance, pool)) or "nobody yet"
                        print(f"srt: step {step} waits for a slot of pool '{pool}' (limit {info.limit}); "
                              f"held by {holders}", file=sys.stderr, flush=True)  # fmt: skip
            except Exception as error:  # a watcher must never break the run it watches
                print(f"srt: cannot inspect the pools: {error}", file=sys.stderr)
                return

    def __enter__(self) -> "PoolWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def ensure_pool_limit(instance: DagsterInstance, pool: str = "gpu") -> None:
    """Create ``pool``'s limit row before any step claims a slot. Dagster creates it at the first
    claim, and two launchers whose first claims meet on a fresh PostgreSQL instance collide on its
    unique key (seen: the second run failed at start); here the loser of that race just goes on."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits or pool in storage.get_concurrency_keys():
        return
    try:
        storage.initialize_concurrency_limit_to_default(pool)
    except Exception:
        if pool not in storage.get_concurrency_keys():  # not the other launcher's row: a real error
            raise
