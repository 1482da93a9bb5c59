"""GPU steps on Celery workers elsewhere (``mantle_assets.celery``), on a real broker, instance, webserver and daemon.

One machine plays README's deployment: a Redis broker and a PostgreSQL instance of their own, a
``dagster-webserver`` and a ``dagster-daemon`` serving ``mantle_assets.celery``, and two Celery
workers, one per queue (``gpu``, and the default ``dagster``), each a process group of its own,
started with README's commands and environment. The instance and the entity store are
PostgreSQL's, not SQLite's and DuckDB's files: the workers open the instance the run's process
hands them and write entities, which on other machines is reachable only as a database server
(files on a network share lock unreliably), and that is what the guide deploys. Everything the
test starts it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import GPU_QUEUE, MASK_DIRECTORY, SEGMENTATION_PIPELINE
from mantle_assets.orchestration.measurements import (
    ASSAY_READOUT,
    MEASUREMENT_PIPELINE,
    MEASUREMENT_TABLE,
    READOUT_PIPELINE,
)
from mantle_assets.orchestration.partitions import image_directory_partitions, partition_key
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import EIGHT_WELLS, register_crop_per_well
from mantle_assets_tests.test_crash_safety import wait_for_first_mask
from mantle_assets_tests.test_interrupts import WELLS, plate
from mantle_assets_tests.ui_server import free_port, stop_process_group

LOCATION = "mantle_assets.celery"
DEFAULT_QUEUE = "dagster"
GPU_STEPS = {"segmentation_masks", "cell_masks", "trained_cellpose_model"}
START_SECONDS = 240
BIN = Path(sys.executable).parent


def test_gpu_steps_and_only_they_go_to_the_gpu_queue():
    from mantle_assets.celery import defs

    graph = defs.resolve_asset_graph()
    queues = {
        key.to_user_string(): graph.get(key).assets_def.op.tags.get("dagster-celery/queue")
        for key in graph.executable_asset_keys
    }
    assert {step for step, queue in queues.items() if queue == GPU_QUEUE} == GPU_STEPS
    assert {queue for step, queue in queues.items() if step not in GPU_STEPS} == {None}  # the default queue
    assert defs.resolve_job_def("segmentation_job").executor_def.name == "mantle_celery"


def test_a_missing_broker_url_is_refused_in_one_line(monkeypatch):
    from mantle_assets.celery import broker_urls

    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    with pytest.raises(ValueError, match=r"^CELERY_BROKER_URL is not set: .*redis://") as refused:
        broker_urls()
    assert "\n" not in str(refused.value)


# --- the deployment on one machine ---------------------------------------------------------------------------


def missing_redis(reason: str):
    """Skip for lack of redis-server, except where CI installs it (MANTLE_REQUIRE_REDIS=1): then fail."""
    if os.environ.get("MANTLE_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (MANTLE_REQUIRE_REDIS=1)")
    pytest.skip(reason)


@pytest.fixture
def redis_broker(tmp_path) -> Iterator[str]:
    """A Redis server of the test's on a free loopback port, keeping nothing on disk: its URL."""
    # Debian installs it in /usr/bin, which a root shell's PATH may lack.
    server = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if server is None:
        missing_redis("no redis-server (Debian package redis-server)")
    folder = tmp_path / "redis"
    folder.mkdir()
    port = free_port()
    with (folder / "server.log").open("w") as log:
        process = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (folder / "server.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process_group(process)


def wait_for(condition, what: str, timeout: float, *processes: subprocess.Popen):
    """``condition()``'s first true value within ``timeout`` s, while every one of ``processes`` is alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        for process in processes:
            assert process.poll() is None, f"{process.args[0]} exited with {process.returncode} before {what}"
        time.sleep(0.5)
    raise AssertionError(f"not {what} within {timeout:.0f} s")


def process_group(pgid: int) -> set[int]:
    """The processes of group ``pgid``, from /proc."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


class Deployment:
    """The processes of README's deployment, started in the test's environment, each its own process group."""

    def __init__(self, stack: ExitStack, env: dict[str, str], logs: Path):
        from mantle_assets.celery import worker_app

        self.stack, self.env, self.logs = stack, env, logs
        self.url = ""
        # The workers' app, to ping them; made afresh (worker_app caches the one of a worker's process).
        self.app = worker_app.__wrapped__()

    def start(self, name: str, *command: str) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("a") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env=self.env)
        self.stack.callback(stop_process_group, process)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-4000:]

    def server(self) -> subprocess.Popen:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        webserver = self.start("webserver", str(BIN / "dagster-webserver"), "-m", LOCATION, "-h", "127.0.0.1",
                               "-p", str(port))

        def serving():
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(serving, "serving the UI", START_SECONDS, webserver)
        return webserver

    def daemon(self) -> subprocess.Popen:
        return self.start("daemon", str(BIN / "dagster-daemon"), "run", "-m", LOCATION)

    def worker(self, queue: str, name: str) -> tuple[subprocess.Popen, set[int]]:
        """A worker of ``queue`` named ``name@<host>``, once it answers: its process and its group's processes."""
        worker = self.start(name, str(BIN / "celery"), "-A", LOCATION, "worker", "-Q", queue, "-n", f"{name}@%h",
                            "--concurrency", "1", "--loglevel", "INFO")
        node = f"{name}@{socket.gethostname()}"
        wait_for(lambda: self.app.control.ping(destination=[node], timeout=1, limit=1),
                 f"{node} answering", START_SECONDS, worker)
        return worker, process_group(worker.pid)

    def graphql(self, query: str, **variables) -> dict:
        request = urllib.request.Request(f"{self.url}/graphql", method="POST",
                                         data=json.dumps({"query": query, "variables": variables}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        assert "errors" not in answer, answer
        return answer["data"]

    def stop_sensors(self, names: set[str]) -> None:
        sensors = self.graphql(
            """query($selector: RepositorySelector!) { sensorsOrError(repositorySelector: $selector) {
                 ... on Sensors { results { name sensorState { id } } } } }""",
            selector={"repositoryLocationName": LOCATION, "repositoryName": "__repository__"},
        )["sensorsOrError"]["results"]
        for sensor in sensors:
            if sensor["name"] in names:
                stopped = self.graphql(
                    """mutation($id: String) { stopSensor(id: $id) { ... on Error { message }
                         ... on StopSensorMutationResult { instigationState { status } } } }""",
                    id=sensor["sensorState"]["id"],
                )["stopSensor"]
                assert stopped == {"instigationState": {"status": "STOPPED"}}, stopped

    def backfill(self, partitions: list[str], assets: list[str], run_config: dict | None = None) -> str:
        """A backfill of ``assets`` over ``partitions``, launched as the UI launches one: its id."""
        params = {"partitionNames": partitions, "assetSelection": [{"path": [asset]} for asset in assets]}
        if run_config:
            params["runConfigData"] = run_config
        launched = self.graphql(
            """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
            params=params,
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return launched["backfillId"]


def step_starts(instance, run_ids) -> list:
    """The STEP_START events of the runs: where each step ran (``pid``), by ``step_key``."""
    return [entry for run_id in run_ids for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)]


def backfill_runs(instance, backfill_id: str) -> list:
    return instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))


def finished_backfill(instance, backfill_id: str):
    backfill = instance.get_backfill(backfill_id)
    return backfill if backfill.status != BulkActionStatus.REQUESTED else None


@pytest.mark.slow
def test_gpu_steps_run_on_the_gpu_worker_and_a_lost_worker_fails_its_step_and_frees_the_slot(
    tmp_path, mantle_home, bundled_model_name, postgres_server, postgres_database, redis_broker,
    monkeypatch,
):
    began = time.monotonic()
    dagster_home = mantle_home / "dagster"
    # README's server environment: one gpu slot (one GPU worker), a backfill's three plates in one run, and the
    # entity store in PostgreSQL beside the instance, written by the workers of both queues and by this process.
    entity_store = f"postgres:{postgres_server.dsn(postgres_server.create_database())}"
    env = os.environ | {
        "CELERY_BROKER_URL": redis_broker, "MANTLE_GPUS": "1", "MANTLE_PLATES_PER_RUN": "3",
        "DAGSTER_HOME": str(dagster_home), "MANTLE_ENTITY_STORE": entity_store,
    }
    monkeypatch.setenv("CELERY_BROKER_URL", redis_broker)  # for this process's pings
    monkeypatch.setenv("MANTLE_ENTITY_STORE", entity_store)
    subprocess.run([sys.executable, "-c", "from mantle_assets.orchestration.instance import write_instance_settings; "
                    "from mantle_assets.settings import dagster_home; write_instance_settings(dagster_home())"],
                   env=env, check=True, timeout=120)
    url = f"postgresql+psycopg2://mantle@/{postgres_database}?host={postgres_server.socket_folder}"
    with (dagster_home / "dagster.yaml").open("a") as settings:
        settings.write(f"storage:\n  postgres:\n    postgres_url: {url}\n")

    store = EntityStore()
    try:
        with ExitStack() as stack, DagsterInstance.from_config(str(dagster_home)) as instance:
            deployment = Deployment(stack, env, tmp_path)
            webserver = deployment.server()
            # The backfills segment and measure; the sensors would request the same runs again. Stopped before the
            # daemon starts: a first tick already under way when the stop lands still launches its runs (seen in CI).
            deployment.stop_sensors({"new_image_directory_sensor", "segmented_directory_sensor", "inbox_sensor"})
            daemon = deployment.daemon()
            defaults = {"segmentation_defaults": {"cellpose_model": bundled_model_name, "diameter": "12"}}
            *plates, later = register_crop_per_well(tmp_path, store, EIGHT_WELLS[:4], "celery", **defaults)
            # 8 fields of 256 x 256: still segmenting when its worker is killed.
            busy = register_image_directory(store, plate(tmp_path, "busy", WELLS[:2], 256), "celery", **defaults)
            keys = {entity.entity_id: partition_key(entity) for entity in [*plates, busy, later]}
            instance.add_dynamic_partitions(image_directory_partitions.name, list(keys.values()))
            gpu, gpu_processes = deployment.worker(GPU_QUEUE, "gpu")
            cpu, cpu_processes = deployment.worker(DEFAULT_QUEUE, "cpu")
            started = time.monotonic()

            # 1. A backfill of three plates: segmented on the gpu worker (one run), measured on the other.
            nightly = deployment.backfill([keys[p.entity_id] for p in plates],
                                          ["segmentation_masks", "cell_measurements", "assay_readout"])
            backfill = wait_for(lambda: finished_backfill(instance, nightly), "the backfill finished", 1200,
                                webserver, daemon, gpu, cpu)
            backfill_seconds = time.monotonic() - started
            runs = backfill_runs(instance, nightly)
            assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, [(r.run_id, r.status) for r in runs]
            assert runs and all(run.status == DagsterRunStatus.SUCCESS for run in runs)
            starts = step_starts(instance, [run.run_id for run in runs])
            segmentation = [e for e in starts if e.step_key == "segmentation_masks"]
            measurement = [e for e in starts if e.step_key != "segmentation_masks"]
            assert len(segmentation) == 1  # the three plates in one run, one step
            assert {e.step_key for e in measurement} >= {"cell_measurements", "assay_readout"}
            assert {e.dagster_event.pid for e in segmentation} <= gpu_processes - {gpu.pid}  # gpu's pool process
            assert {e.dagster_event.pid for e in measurement} <= cpu_processes - {cpu.pid}
            print(f"backfill of 3 plates: {len(runs)} runs in {backfill_seconds:.0f} s; steps on gpu: "
                  f"{len(segmentation)}, on cpu: {len(measurement)} ({sorted(e.step_key for e in measurement)})")

            run_ids = {run.run_id for run in runs}
            for source in plates:
                (masks,) = [edge for edge in store.children(source.entity_id) if edge.pipeline == SEGMENTATION_PIPELINE]
                (table,) = [edge for edge in store.children(masks.child_id) if edge.pipeline == MEASUREMENT_PIPELINE]
                (readout,) = [edge for edge in store.children(table.child_id) if edge.pipeline == READOUT_PIPELINE]
                assert store.get(masks.child_id).data_type == MASK_DIRECTORY
                assert store.get(table.child_id).data_type == MEASUREMENT_TABLE
                assert store.get(readout.child_id).data_type == ASSAY_READOUT
                assert {masks.run_id, table.run_id, readout.run_id} <= run_ids
                assert source.entity_id in {edge.parent_id for edge in store.parents(table.child_id)}

            # 2. The gpu worker killed, all its processes, while it segments: the step fails, the slot is freed.
            killed = deployment.backfill([keys[busy.entity_id]], ["segmentation_masks"],
                                         {"execution": {"config": {"worker_lost_after_seconds": 10}}})
            wait_for_first_mask(mantle_home / "masks" / busy.entity_id, gpu)
            (run,) = backfill_runs(instance, killed)
            assert run.run_id in instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
            os.killpg(gpu.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: instance.get_run_by_id(run.run_id).is_finished, "the run ended", 300, webserver, daemon)
            ended_after = time.monotonic() - killed_at
            (failure,) = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
            assert failure.step_key == "segmentation_masks"
            reason = failure.dagster_event.step_failure_data.error.message
            assert reason.startswith(f"Celery worker gpu@{socket.gethostname()} stopped answering"), reason
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
            info = instance.event_log_storage.get_concurrency_info("gpu")
            assert run.run_id not in info.active_run_ids | info.pending_run_ids
            (start,) = step_starts(instance, [run.run_id])
            assert start.step_key == "segmentation_masks" and start.dagster_event.pid in gpu_processes - {gpu.pid}
            assert not [edge for edge in store.children(busy.entity_id) if edge.pipeline == SEGMENTATION_PIPELINE]
            print(f"gpu worker killed mid-step: run failed {ended_after:.0f} s later: {reason}")

            # 3. A restarted gpu worker takes the next run's gpu step: the killed run's slot is free.
            gpu, restarted_processes = deployment.worker(GPU_QUEUE, "gpu")
            restarted = time.monotonic()
            retried = deployment.backfill([keys[later.entity_id]], ["segmentation_masks"])
            wait_for(lambda: finished_backfill(instance, retried), "the later backfill finished", 600,
                     webserver, daemon, gpu)
            (after,) = backfill_runs(instance, retried)
            assert instance.get_run_by_id(after.run_id).status == DagsterRunStatus.SUCCESS
            (start,) = step_starts(instance, [after.run_id])
            assert start.dagster_event.pid in restarted_processes - {gpu.pid}
            # The killed step's task was acknowledged when it started: the restarted worker did not run it again.
            assert len(step_starts(instance, [run.run_id])) == 1
            print(f"restarted gpu worker: next plate segmented {time.monotonic() - restarted:.0f} s after it answered")
            # ended_run_cleanup_sensor (in the daemon) removed what the killed step had written.
            busy_masks = mantle_home / "masks" / busy.entity_id
            wait_for(lambda: not list(busy_masks.glob(f"{PARTIAL_PREFIX}*")), "the killed step's partial masks removed",
                     120, daemon)

            # 4. Only the pool process running the step killed (as the OOM killer would): the worker lives on and
            # reports it, and the step fails at once.
            oom = deployment.backfill([keys[busy.entity_id]], ["segmentation_masks"])
            wait_for_first_mask(busy_masks, gpu)
            (run,) = backfill_runs(instance, oom)
            (start,) = step_starts(instance, [run.run_id])
            os.kill(start.dagster_event.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: instance.get_run_by_id(run.run_id).is_finished, "the run ended", 120, webserver, daemon,
                     gpu)
            ended_after = time.monotonic() - killed_at
            (failure,) = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
            reason = failure.dagster_event.step_failure_data.error.message
            assert reason.startswith("The pool process running step segmentation_masks in a Celery worker died: "
                                     "Worker exited prematurely: signal 9 (SIGKILL)"), reason
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
            info = instance.event_log_storage.get_concurrency_info("gpu")
            assert run.run_id not in info.active_run_ids | info.pending_run_ids
            assert not [edge for edge in store.children(busy.entity_id) if edge.pipeline == SEGMENTATION_PIPELINE]
            print(f"gpu worker's pool process killed mid-step: run failed {ended_after:.0f} s later: {reason}")
            print(f"celery test wall time {time.monotonic() - began:.0f} s")
    except BaseException:
        for name in ("webserver", "daemon", "gpu", "cpu"):
            if (tmp_path / f"{name}.log").exists():
                print(f"--- {name} log ---\n{(tmp_path / f'{name}.log').read_text()[-6000:]}")
        raise
