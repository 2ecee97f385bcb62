"""The state store: one run (or many, in a central database) in tables, written in batches."""
