from dagster import DagsterInstance

from mantle_assets.orchestration.instance import write_instance_settings


def test_settings_queue_runs_and_size_the_gpu_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("MANTLE_MAX_RUNS", "3")
    monkeypatch.setenv("MANTLE_GPUS", "2")
    write_instance_settings(tmp_path / "dagster")
    with DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        config = instance.get_concurrency_config()
    assert config.run_queue_config.max_concurrent_runs == 3
    assert config.pool_config.default_pool_limit == 2


def test_existing_settings_are_never_overwritten(tmp_path):
    settings = tmp_path / "dagster.yaml"
    settings.write_text("# mine\n")
    write_instance_settings(tmp_path)
    assert settings.read_text() == "# mine\n"
