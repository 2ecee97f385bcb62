"""The engine: one run's DAG state machine, the dispatcher over runs and sites, run lock, ingest."""
