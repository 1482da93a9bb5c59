"""The entity store on an attached catalog: a DuckDB file attached through its ``duckdb:`` URI.

It takes the code path of ``ducklake:``/``postgres:`` targets, which ``test_store_postgres`` runs on a real server.
"""

import duckdb
import pytest

from mantle_assets.entities import EntityStore, StoreBusyError


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "plate"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"")
    return folder


def test_entities_and_lineage_live_in_the_attached_catalog(tmp_path, image_folder, monkeypatch):
    catalog = tmp_path / "catalog.duckdb"
    monkeypatch.setenv("MANTLE_ENTITY_STORE", f"duckdb:{catalog}")
    store = EntityStore()
    assert store.database == f"duckdb:{catalog}"

    source = store.register("image_directory", "plate", {"image_directory": str(image_folder)})
    masks_folder = tmp_path / "masks"
    masks_folder.mkdir()
    output = store.record_output(
        "segmentation_mask_directory", "plate masks",
        {"mask_directory": str(masks_folder), "source_entity": source.entity_id, "cellpose_model": "nuclei",
         "nuclei_channel": 0, "cytoplasm_channel": 0, "diameter": "None"},
        parents=[source.entity_id], pipeline="cellpose-segmentation", run_id="run-1", parameters={},
    )

    assert [e.entity_id for e in EntityStore(f"duckdb:{catalog}").list()] == [source.entity_id, output.entity_id]
    assert not (tmp_path / "catalog.duckdb.lock").exists()  # catalogs order their own writers
    with duckdb.connect(str(catalog), read_only=True) as connection:
        edges = connection.execute("SELECT parent_id, child_id FROM lineage_edges").fetchall()
    assert edges == [(source.entity_id, output.entity_id)]


def test_unreachable_catalog_is_a_one_line_busy_error(tmp_path):
    store = EntityStore(f"duckdb:{tmp_path / 'no such folder' / 'catalog.duckdb'}")
    with pytest.raises(StoreBusyError, match="cannot attach entity store duckdb:") as raised:
        store.list()
    assert "\n" not in str(raised.value)


def test_a_catalogs_password_is_in_no_message_nor_listing(tmp_path):
    # No server answers on this socket folder: attaching fails, and the error names the store.
    catalog = f"postgres:dbname=mantle host={tmp_path} user=mantle password=s3cret-word"
    store = EntityStore(catalog, lock_timeout=0)
    with pytest.raises(StoreBusyError) as refused:
        store.list()
    assert "host=" in str(refused.value) and "s3cret-word" not in str(refused.value)
    assert "s3cret-word" not in str(store.database) + repr(store)
    assert "password=***" in str(store.database)
