"""Alembic revisions of the state store (loaded by Alembic from their files)."""
