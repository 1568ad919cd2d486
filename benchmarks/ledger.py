"""Ledger throughput and accounting latency; writes benchmarks/results/ledger.json.

* admissions per second with 1, 4, 16 and 40 concurrent client processes, on SQLite (a file in a
  temporary directory) and PostgreSQL (a throwaway database on 127.0.0.1:5432);
* admission latency (one ``reserve``, one client) on a dataset already holding 0, 100 and 1000
  charges: ``first_ms`` is a fresh process's first admission, ``median_ms`` the later ones
  (admission checks the spend index against the dataset's chain; later admissions replay only
  the events appended since);
* time to compute a dataset's guaranteed epsilon (``Ledger.budget``, from the spend index) with 1,
  100 and 1000 charges, both for a recurring job (identical mechanisms, merged) and for
  all-distinct ones; ``median_ms`` with the per-step RDP cache warm (a long-running process),
  ``cold_ms`` with it empty (a fresh ``dpops budget`` process).

The machine's load average is recorded at start and end: on a shared 2-core machine the
throughput figures move with whatever else runs.

Targets (issue 3): >= 200 admissions/s on PostgreSQL with 16 clients; < 50 ms for 1000 charges.

    .venv/bin/python benchmarks/ledger.py [--per-client 50] [--clients 1 4 16 40]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from dpops.ledger.store import Ledger
from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
MECH = SubsampledGaussian(1.0, 0.001, 100)


def _client(url: str, per_client: int, barrier, out) -> None:
    ledger = Ledger(url, create=False)
    # Warm up as a long-running client would be: imports, per-step RDP cache, connection pool.
    filters.filter_epsilon(ledger.counted("bench") + [MECH], delta=1e-7)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(per_client):
        ledger.reserve(dataset="bench", mechanism=MECH, max_grad_norm=1.0, n_records=1_000_000, job="bench", data_version="v")
    out.put((t0, time.perf_counter()))
    ledger.dispose()


def admissions(url: str, clients: int, per_client: int) -> dict:
    ledger = Ledger(url)
    ledger.register_dataset(name="bench", unit="record", delta=1e-7, epsilon_cap=1000)
    ledger.dispose()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, per_client, barrier, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    spans = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    total = clients * per_client
    return {"clients": clients, "admissions": total, "seconds": round(wall, 3), "admissions_per_second": round(total / wall, 1)}


def admission_latency(url: str, n_charges: int, repeats: int = 20) -> dict:
    ledger = Ledger(url)
    name = f"adm{n_charges}"
    ledger.register_dataset(name=name, unit="record", delta=1e-7, epsilon_cap=1000)
    for i in range(n_charges):  # a history: most charges committed, some still reserved
        c = ledger.reserve(dataset=name, mechanism=MECH, max_grad_norm=1.0, n_records=1_000_000, job="j", data_version="v")
        if i % 4:
            ledger.start(c.id)
            ledger.commit(c.id, steps_run=MECH.steps)
    ledger.dispose()
    ledger = Ledger(url, create=False)  # a fresh client: nothing of the chain cached yet
    filters.filter_epsilon([MECH], delta=1e-7)  # warm the per-step RDP cache, as the clients above do
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        ledger.reserve(dataset=name, mechanism=MECH, max_grad_norm=1.0, n_records=1_000_000, job="bench", data_version="v")
        times.append(time.perf_counter() - t0)
    ledger.dispose()
    return {"charges": n_charges, "first_ms": round(1000 * times[0], 2), "median_ms": round(1000 * statistics.median(times[1:]), 2)}


def _fresh(backend: str, fn, *args) -> dict:
    """``fn(url, *args)`` on a throwaway ledger of ``backend``."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            return fn(f"sqlite:///{d}/ledger.db", *args)
    name, url = _pg_url()
    try:
        return fn(url, *args)
    finally:
        _pg_drop(name)


def epsilon_latency(url: str, n_charges: int, distinct: bool, repeats: int = 5) -> dict:
    ledger = Ledger(url)
    name = f"lat{n_charges}{'d' if distinct else 'r'}"
    ledger.register_dataset(name=name, unit="record", delta=1e-7, epsilon_cap=1000)
    for i in range(n_charges):
        mech = SubsampledGaussian(1.0 + (i * 1e-4 if distinct else 0.0), 0.001, 100)
        c = ledger.reserve(dataset=name, mechanism=mech, max_grad_norm=1.0, n_records=1_000_000, job="j", data_version="v")
        ledger.start(c.id)
        steps = 100 - (i % 7)
        if steps < 100:  # below the reserved steps only at the trainer's own completed result
            ledger.record_finished(c.id, steps_run=steps)
        ledger.commit(c.id, steps_run=steps)
    # Cold: a fresh process knows no per-step RDP yet (one dp_accounting + Opacus call per distinct mechanism).
    accounting._rdp_one_step.cache_clear()
    t0 = time.perf_counter()
    ledger.budget(name)
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ledger.budget(name)
        times.append(time.perf_counter() - t0)
    ledger.dispose()
    return {"charges": n_charges, "mechanisms": "distinct" if distinct else "recurring (merged)",
            "median_ms": round(1000 * statistics.median(times), 2), "cold_ms": round(1000 * cold, 2)}


def _pg_url():
    import psycopg

    name = f"dpops_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 40])
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--only", choices=["admission_latency"], help="run only this part (and print it)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ledger.json"))
    args = parser.parse_args()

    if args.only == "admission_latency":
        for backend in ("sqlite", "postgresql"):
            for n in (0, 100, 1000):
                print(backend, _fresh(backend, admission_latency, n), flush=True)
        return
    result: dict = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "per_client": args.per_client, "admissions": {}, "epsilon_latency": {}}
    for backend in ("sqlite", "postgresql"):
        result["admissions"][backend] = []
        for clients in args.clients:
            if backend == "sqlite":
                with tempfile.TemporaryDirectory() as d:
                    row = admissions(f"sqlite:///{d}/ledger.db", clients, args.per_client)
            else:
                name, url = _pg_url()
                try:
                    row = admissions(url, clients, args.per_client)
                finally:
                    _pg_drop(name)
            print(backend, row, flush=True)
            result["admissions"][backend].append(row)
        result.setdefault("admission_latency", {})[backend] = []
        for n in (0, 100, 1000):
            row = _fresh(backend, admission_latency, n)
            print(backend, row, flush=True)
            result["admission_latency"][backend].append(row)
        result["epsilon_latency"][backend] = []
        for n in (1, 100, 1000):
            for distinct in (False, True):
                if backend == "sqlite":
                    with tempfile.TemporaryDirectory() as d:
                        row = epsilon_latency(f"sqlite:///{d}/ledger.db", n, distinct)
                else:
                    name, url = _pg_url()
                    try:
                        row = epsilon_latency(url, n, distinct)
                    finally:
                        _pg_drop(name)
                print(backend, row, flush=True)
                result["epsilon_latency"][backend].append(row)
    result["load_average_at_end"] = os.getloadavg()
    result["targets"] = {"postgresql_16_clients_admissions_per_second": 200, "epsilon_1000_charges_ms": 50}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
