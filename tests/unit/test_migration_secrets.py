"""Migration 0007 (task secrets) goes down and up again on SQLite; a row written before it
reads as naming no secrets. (PostgreSQL runs it in every session's ``postgres_url``.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command

from rexec.dispatcher.db.migrate import alembic_config, upgrade


def test_secrets_column_down_and_up(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    url = f"sqlite+aiosqlite:///{db}"
    upgrade(url, "0003")
    with sqlite3.connect(db) as connection:
        connection.execute(
            "INSERT INTO pools (name, description, draining, created_at) VALUES ('p', '', 0, 0)"
        )
        connection.execute(
            "INSERT INTO tasks (id, pool, kind, target, argv_json, args_json, kwargs_json, state,"
            " attempt, max_attempts, retry_backoff, cancel_requested, created_at)"
            " VALUES ('t', 'p', 'function', 'm:f', '[]', '[]', '{}', 'queued', 1, 1, 0, 0, 0)"
        )
    upgrade(url, "0007")
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT secrets_json FROM tasks").fetchall() == [("[]",)]
    command.downgrade(alembic_config(url), "0006")
    with sqlite3.connect(db) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    assert "secrets_json" not in columns
    upgrade(url, "0007")
