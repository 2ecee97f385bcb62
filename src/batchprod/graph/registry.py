"""The data registry: datasets (type, data ID, location, size, checksum) and dimension relations.

SQLite through SQLAlchemy Core, so a PostgreSQL registry is a URL away. Data IDs are stored as
canonical JSON (sorted keys) so equal data IDs compare equal as text and can be indexed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from batchprod.errors import GraphError

DataId = Mapping[str, Any]

_md = sa.MetaData()
dataset_type_t = sa.Table(
    "dataset_type",
    _md,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("dimensions", sa.String, nullable=False),
)
dataset_t = sa.Table(
    "dataset",
    _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("dataset_type", sa.String, sa.ForeignKey("dataset_type.name"), nullable=False),
    sa.Column("run", sa.String, nullable=False),
    sa.Column("data_id", sa.String, nullable=False),
    sa.Column("location", sa.String, nullable=False),
    sa.Column("size", sa.BigInteger),
    sa.Column("checksum", sa.String),
    sa.UniqueConstraint("dataset_type", "run", "data_id"),
)
relation_t = sa.Table(
    "dimension_relation",
    _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("left_dims", sa.String, nullable=False),
    sa.Column("left_data_id", sa.String, nullable=False),
    sa.Column("right_dims", sa.String, nullable=False),
    sa.Column("right_data_id", sa.String, nullable=False),
    sa.Index("ix_relation_dims", "left_dims", "right_dims"),
)


def canonical(data_id: DataId) -> str:
    """Canonical text of a data ID: JSON with sorted keys and no spaces."""
    return json.dumps(dict(data_id), sort_keys=True, separators=(",", ":"))


def dims_key(dims: Iterable[str]) -> str:
    return ",".join(sorted(dims))


@dataclass(frozen=True)
class DatasetRecord:
    """One registered dataset."""

    id: int
    dataset_type: str
    run: str
    data_id: dict[str, Any]
    location: str
    size: int | None
    checksum: str | None


class Registry:
    """A data registry in one SQLite file (or any SQLAlchemy URL)."""

    def __init__(self, url_or_path: str | Path, create: bool = False) -> None:
        url = str(url_or_path)
        if "://" not in url:
            path = Path(url)
            if not create and not path.is_file():
                raise GraphError(f"{path}: data registry not found")
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
            self.root = path.parent
        else:
            self.root = Path.cwd()
        self.engine = sa.create_engine(url)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            _md.create_all(self.engine)
        else:
            insp = sa.inspect(self.engine)
            if not insp.has_table("dataset"):
                raise GraphError(f"{url_or_path}: not a batchprod data registry (no 'dataset' table)")

    # -- writing ------------------------------------------------------------------------------------
    def register_dataset_type(self, name: str, dimensions: Sequence[str]) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(dataset_type_t.c.dimensions).where(dataset_type_t.c.name == name)
            ).first()
            if row is None:
                conn.execute(dataset_type_t.insert().values(name=name, dimensions=",".join(dimensions)))
            elif row[0] != ",".join(dimensions):
                raise GraphError(
                    f"dataset type '{name}' already registered with dimensions ({row[0]}), not ({','.join(dimensions)})"
                )

    def insert_datasets(
        self,
        dataset_type: str,
        run: str,
        rows: Iterable[tuple[DataId | str, str, int | None, str | None]],
        skip_existing: bool = False,
        update_existing: bool = False,
    ) -> int:
        """Bulk-insert (data ID, location, size, checksum) rows; returns how many were given. A data ID
        may come as its canonical JSON text already (ingest from a state store keeps it so).
        ``skip_existing``: rows already registered (same type, run, data ID) are left as they are, so
        an ingest can be repeated after a crash. ``update_existing``: they take the new location, size
        and checksum instead (a dataset made again, e.g. by a final job that re-ran)."""
        payload = [
            {
                "dataset_type": dataset_type,
                "run": run,
                "data_id": d if isinstance(d, str) else canonical(d),
                "location": loc,
                "size": size,
                "checksum": ck,
            }
            for d, loc, size, ck in rows
        ]
        if payload:
            ins: Any = dataset_t.insert()
            if skip_existing or update_existing:
                dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
                ins = dialect.insert(dataset_t)
                keys = ["dataset_type", "run", "data_id"]
                if update_existing:
                    ex = ins.excluded
                    ins = ins.on_conflict_do_update(index_elements=keys, set_={
                        "location": ex.location, "size": ex.size, "checksum": ex.checksum})
                else:
                    ins = ins.on_conflict_do_nothing(index_elements=keys)
            with self.engine.begin() as conn:
                conn.execute(ins, payload)
        return len(payload)

    def insert_relations(
        self, left_dims: Sequence[str], right_dims: Sequence[str], pairs: Iterable[tuple[DataId, DataId]]
    ) -> int:
        lk, rk = dims_key(left_dims), dims_key(right_dims)
        payload = [
            {"left_dims": lk, "left_data_id": canonical(a), "right_dims": rk, "right_data_id": canonical(b)}
            for a, b in pairs
        ]
        if payload:
            with self.engine.begin() as conn:
                conn.execute(relation_t.insert(), payload)
        return len(payload)

    # -- reading ------------------------------------------------------------------------------------
    def dataset_types(self) -> dict[str, tuple[str, ...]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(dataset_type_t.c.name, dataset_type_t.c.dimensions)).all()
        return {n: tuple(d.split(",")) if d else () for n, d in rows}

    def runs(self) -> list[str]:
        """Every run that holds datasets."""
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.select(dataset_t.c.run).distinct()))

    def run_datasets(self, run: str) -> set[tuple[str, str]]:
        """(dataset type, canonical data ID) of every dataset registered under ``run``."""
        with self.engine.connect() as conn:
            q = sa.select(dataset_t.c.dataset_type, dataset_t.c.data_id).where(dataset_t.c.run == run)
            return {(t, d) for t, d in conn.execute(q)}

    def remove_run(self, run: str) -> int:
        """Delete every dataset row of ``run`` (the files are the caller's); returns how many."""
        with self.engine.begin() as conn:
            return conn.execute(dataset_t.delete().where(dataset_t.c.run == run)).rowcount or 0

    def dimensions(self) -> set[str]:
        """Every dimension the registry knows (from dataset types and relations)."""
        dims: set[str] = set()
        for d in self.dataset_types().values():
            dims.update(d)
        with self.engine.connect() as conn:
            for lk, rk in conn.execute(sa.select(relation_t.c.left_dims, relation_t.c.right_dims).distinct()):
                dims.update(lk.split(","))
                dims.update(rk.split(","))
        dims.discard("")
        return dims

    def find_datasets(self, dataset_type: str, runs: Sequence[str] | None = None) -> list[DatasetRecord]:
        q = sa.select(dataset_t).where(dataset_t.c.dataset_type == dataset_type).order_by(dataset_t.c.id)
        if runs:
            q = q.where(dataset_t.c.run.in_(list(runs)))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [
            DatasetRecord(r.id, r.dataset_type, r.run, json.loads(r.data_id), r.location, r.size, r.checksum)
            for r in rows
        ]

    def relations(self, dims_a: Sequence[str], dims_b: Sequence[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Pairs (data ID over dims_a, data ID over dims_b) related in either stored direction."""
        ak, bk = dims_key(dims_a), dims_key(dims_b)
        out: list[tuple[dict[str, Any], dict[str, Any]]] = []
        with self.engine.connect() as conn:
            for left, right, lk in conn.execute(
                sa.select(relation_t.c.left_data_id, relation_t.c.right_data_id, relation_t.c.left_dims).where(
                    sa.or_(
                        sa.and_(relation_t.c.left_dims == ak, relation_t.c.right_dims == bk),
                        sa.and_(relation_t.c.left_dims == bk, relation_t.c.right_dims == ak),
                    )
                )
            ):
                a, b = json.loads(left), json.loads(right)
                out.append((a, b) if lk == ak else (b, a))
        return out

    def relation_dims(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(relation_t.c.left_dims, relation_t.c.right_dims).distinct()).all()
        return [(tuple(a.split(",")), tuple(b.split(","))) for a, b in rows]

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
