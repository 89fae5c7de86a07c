"""The metadata database: models, engine, and migrations (under ``dispatcher/migrations``)."""
