"""Alembic migrations of the state store (``env.py``, ``versions/``); ``baseline`` is revision 0001's schema."""
