"""Small helpers shared by the tests."""

import re
from pathlib import Path

import yaml


def edit_yaml(path: Path, fn) -> None:
    """Load the YAML file at ``path``, let ``fn`` change the data in place, write it back."""
    data = yaml.safe_load(Path(path).read_text())
    fn(data)
    Path(path).write_text(yaml.safe_dump(data))


def policy_accepting_inconclusive(directory: Path) -> str:
    """A policy file that accepts an INCONCLUSIVE audit, so that plan admits a job whose canaries
    are too few to test its epsilon (tests that train with 10 canaries for speed); returns its path."""
    path = Path(directory) / "policy_accepting_inconclusive.yaml"
    path.write_text(yaml.safe_dump({"min_accuracy": 0.0, "accept_inconclusive": True}))
    return str(path)


def public_dataset(name: str = "d", **fields):
    """A dataset config declared public (``public: true``): the trainer may then run on it without a
    ledger charge or without noise, as the unit tests of the trainer do."""
    from dpops.config.schema import DatasetConfig

    return DatasetConfig(**{"name": name, "files": {"train": "t", "holdout": "h", "eval": "e"}, "text_column": "text",
                            "label_column": "label", "labels": ["0", "1"], "privacy": {"epsilon_cap": 8, "delta": 1e-3},
                            "public": True, **fields})


def steward_file(message: str) -> Path:
    """The steward-only file a validation error points to (it holds the first offending rows)."""
    return Path(re.search(r"for the data steward only: (\S+\.txt)\.", message).group(1))


def tamper(ledger_or_engine, statement: str, params=None) -> None:
    """Run one SQL statement directly against a ledger's database, as its owner (or an attacker with
    the owner's rights) would: past the library and past the database's append-only triggers.

    Every test that edits, deletes or forges ledger rows goes through this, so that the tamper
    cases exercise ``verify``'s detection whatever the database enforces on its own.
    """
    from sqlalchemy import text

    engine = getattr(ledger_or_engine, "engine", ledger_or_engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # as the superuser: user triggers do not fire
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        else:  # anyone with the file can drop them; they stay dropped, as an attacker would leave them
            for (name,) in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'dpops_append_only_%'").all():
                conn.exec_driver_sql(f'DROP TRIGGER "{name}"')
        conn.execute(text(statement), params or {})


def rehash_chain(ledger, dataset: str) -> None:
    """Recompute every event hash of ``dataset``'s chain and its stored head, in seq order, as an
    attacker who rewrites the chain consistently would: afterwards no hash or link is broken, so
    only checks of what the events say (not of their hashes) can catch a forged or edited event."""
    from sqlalchemy import text

    from dpops.ledger.chain import _event_hash
    from dpops.ledger.states import GENESIS

    with ledger.engine.connect() as conn:
        ds_id = conn.execute(text("SELECT id FROM datasets WHERE name = :n"), {"n": dataset}).scalar_one()
        events = conn.execute(text("SELECT id, seq, kind, charge_id, payload, created_at FROM events "
                                   "WHERE dataset_id = :d ORDER BY seq"), {"d": ds_id}).all()
    prev, seq = GENESIS, 0
    for ev in events:
        digest = _event_hash(dataset, ev.seq, ev.kind, ev.charge_id, ev.payload, ev.created_at, prev)
        tamper(ledger, "UPDATE events SET prev_hash = :p, hash = :h WHERE id = :i", {"p": prev, "h": digest, "i": ev.id})
        prev, seq = digest, ev.seq
    tamper(ledger, "UPDATE datasets SET head_seq = :s, head_hash = :h WHERE id = :d", {"s": seq, "h": prev, "d": ds_id})


def forge_event(ledger, dataset: str, kind: str, charge_id, payload: dict) -> None:
    """Append a forged event to ``dataset``'s chain and rehash it (see :func:`rehash_chain`)."""
    import json

    from sqlalchemy import text

    from dpops.ledger.chain import _now

    with ledger.engine.connect() as conn:
        ds_id, head = conn.execute(text("SELECT id, head_seq FROM datasets WHERE name = :n"), {"n": dataset}).one()
    tamper(ledger, "INSERT INTO events (dataset_id, seq, charge_id, kind, payload, created_at, prev_hash, hash) "
                   "VALUES (:d, :s, :c, :k, :p, :t, '', '')",
           {"d": ds_id, "s": head + 1, "c": charge_id, "k": kind,
            "p": json.dumps(payload, sort_keys=True, separators=(",", ":")), "t": _now()})
    rehash_chain(ledger, dataset)
