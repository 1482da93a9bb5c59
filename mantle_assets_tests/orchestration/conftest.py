"""Fixtures of the orchestration tests beyond the shared ones: a throwaway PostgreSQL server."""

from mantle_assets_tests.postgres import postgres_database, postgres_server  # noqa: F401 (fixtures pytest finds here)
