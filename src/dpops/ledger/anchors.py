"""Anchors: the ledger's chain heads, signed and kept outside its database.

:meth:`dpops.ledger.store.Ledger.verify` recomputes the ledger from its own rows, so it cannot see what
an owner of the database does consistently: delete the last events and roll the stored chain head
back to match (a truncated tail), or rewrite the whole chain (charges re-stated at another sigma,
gate evidence edited) and recompute every hash and the head. Whoever holds the database can make
its rows agree with each other; they cannot make them agree with a copy they do not hold.

An **anchor** is such a copy: a chain head (dataset, seq, the hash of the event at seq) that the
ledger appends to a log outside its database after each transaction that commits a charge, fails
one (``failed_charged``), records gate evidence or records a gate decision. Each line is signed
(HMAC-SHA256) under a key the database does not hold either: ``DPOPS_ANCHOR_KEY`` (64 hex digits)
or ``$DPOPS_HOME/anchor.key``, created (mode 0600) on first use. This is the model of Certificate
Transparency's signed tree heads and of the digests immudb and QLDB hand their clients: the
verifier keeps what the database said, and the database cannot take it back.

:func:`verify_anchors` checks every anchor against the chain as the database holds it now,
recomputing each event's hash from its content (not trusting the stored hash column): an anchor
whose MAC fails was edited or forged; one beyond the chain's last event means a truncated tail;
one whose hash differs from the recomputed event hash at its seq means a rewritten chain.

An anchor older than the chain's head is fine (events after the last anchor are covered by the
next one); verify only needs each anchor to match. So several logs (one per machine) each verify
on their own, and an anchor that could not be written (its failure is logged; the ledger's
transaction is already committed and stays) only leaves a gap. What anchors cannot see: events
after the last anchor that are deleted before the next one is written, and lines deleted from the
log's own tail; keep the log where the database's operators cannot rewrite it (append-only or
WORM storage, or copy it off the machine), and the key away from them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dpops.errors import ConfigError

if TYPE_CHECKING:
    from dpops.config.workspace import Workspace
    from dpops.ledger.store import Ledger

try:  # serialises appends across processes; O_APPEND alone already keeps each line whole
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

#: Environment variable holding the anchor key, hex; overrides the workspace's key file.
ANCHOR_KEY_ENV = "DPOPS_ANCHOR_KEY"
#: Environment variable naming the anchor log; default ``$DPOPS_HOME/anchors.jsonl``.
ANCHOR_LOG_ENV = "DPOPS_ANCHOR_LOG"
#: Bytes of an anchor key.
ANCHOR_KEY_BYTES = 32
#: The signed fields of an anchor, in the order a line holds them (the MAC follows).
FIELDS = ("dataset", "seq", "head", "kind", "at", "key_id")


def anchor_key(ws: Optional["Workspace"] = None, *, create: bool = True) -> bytes:
    """The anchor key: ``DPOPS_ANCHOR_KEY`` (hex) when set, else ``$DPOPS_HOME/anchor.key``,
    created (32 random bytes, mode 0600) on first use when ``create``.

    Raises:
        ConfigError: the variable is not 64 hex digits, or the key file is missing (``create``
            false), malformed or readable by others (its value is never shown).
    """
    from dpops.config.workspace import _create_key_file, key_from_env, workspace

    key = key_from_env(ANCHOR_KEY_ENV, ANCHOR_KEY_BYTES)
    if key is not None:
        return key
    path = (ws or workspace()).anchor_key_file
    if not path.exists():
        if not create:
            raise ConfigError(f"{path}: no anchor key (and {ANCHOR_KEY_ENV} is not set): the anchors cannot be checked "
                              "without the key they were signed under")
        _create_key_file(path)
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: the anchor key is readable by others; `chmod 600 {path}`")
    key = path.read_bytes()
    if len(key) != ANCHOR_KEY_BYTES:
        raise ConfigError(f"{path}: an anchor key file holds exactly {ANCHOR_KEY_BYTES} bytes")
    return key


def key_id(key: bytes) -> str:
    """A short public name of a key (an HMAC of a constant under it): tells a wrong key from an
    edited line without revealing anything of the key."""
    return hmac.new(key, b"dpops anchor key id", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    body = json.dumps({k: fields[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Anchor:
    """One signed chain head, as one line of the log holds it."""

    dataset: str
    seq: int
    head: str
    kind: str
    at: str
    key_id: str
    mac: str

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")) + "\n"


class AnchorLog:
    """An append-only file of signed chain heads, one JSON line each.

    Args:
        path: the log file (created on the first append).
        key: the signing key; default :func:`anchor_key` of ``ws`` (read when first needed).
        ws: the workspace whose key file to use (default: the current one).
    """

    def __init__(self, path: str | Path, key: Optional[bytes] = None, *, ws: Optional["Workspace"] = None) -> None:
        self.path = Path(path)
        self._key = key
        self._ws = ws

    @classmethod
    def for_workspace(cls, ws: Optional["Workspace"] = None) -> "AnchorLog":
        """The workspace's log (``DPOPS_ANCHOR_LOG`` or ``$DPOPS_HOME/anchors.jsonl``) and key."""
        from dpops.config.workspace import workspace

        ws = ws or workspace()
        return cls(ws.anchor_log, ws=ws)

    def key(self, *, create: bool = True) -> bytes:
        if self._key is None:
            self._key = anchor_key(self._ws, create=create)
        return self._key

    def append(self, dataset: str, seq: int, head: str, kind: str) -> Anchor:
        """Sign a chain head and append it durably: one ``write`` of the whole line to a file
        opened ``O_APPEND`` (under an exclusive ``flock``), then ``fsync``. Concurrent writers,
        threads or processes, never interleave their lines."""
        key = self.key()
        fields = {"dataset": dataset, "seq": int(seq), "head": head, "kind": kind,
                  "at": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "key_id": key_id(key)}
        anchor = Anchor(**fields, mac=_mac(key, fields))
        data = anchor.line().encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            written = os.write(fd, data)
            if written != len(data):  # a full disk: say so rather than leave a line half-signed
                raise OSError(f"{self.path}: wrote {written} of {len(data)} bytes of an anchor")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if created:  # make the new file's directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return anchor

    def lines(self) -> list[tuple[int, str]]:
        """(line number, text) of every non-blank line of the log; none when the log does not exist."""
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse(line: str) -> Optional[dict[str, Any]]:
    """The fields of an anchor line, or None when it is not one (torn, edited into non-JSON)."""
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, dict) or set(fields) != {*FIELDS, "mac"}:
        return None
    if not (isinstance(fields["seq"], int) and not isinstance(fields["seq"], bool)):
        return None
    if not all(isinstance(fields[k], str) for k in (*FIELDS, "mac") if k != "seq"):
        return None
    return fields


def _recomputed_chain(ledger: "Ledger", dataset_id: int, name: str) -> tuple[dict[int, str], int]:
    """The hash of every event of the dataset, recomputed from the events' content in seq order
    (each linked to the previous recomputed hash, not to the stored one), and the last seq."""
    from sqlalchemy import select

    from dpops.ledger.chain import _event_hash
    from dpops.ledger.schema import _EVENTS
    from dpops.ledger.states import GENESIS

    e = _EVENTS.c
    hashes: dict[int, str] = {}
    prev, last = GENESIS, 0
    with ledger.engine.connect() as conn:
        for ev in conn.execute(select(e.seq, e.kind, e.charge_id, e.payload, e.created_at)
                               .where(e.dataset_id == dataset_id).order_by(e.seq)):
            prev = _event_hash(name, ev.seq, ev.kind, ev.charge_id, ev.payload, ev.created_at, prev)
            hashes[ev.seq], last = prev, ev.seq
    return hashes, last


def verify_anchors(ledger: "Ledger", log: AnchorLog) -> list[str]:
    """Check every anchor of ``log`` against ``ledger``'s chains; the problems found (empty: all match).

    Reported: a line that is not a signed anchor (torn or edited), a bad MAC (an edited or forged
    line), lines signed under another key (named once, with both key ids), an anchored dataset the
    ledger does not hold, an anchored seq beyond the chain's last event (a truncated tail) or
    missing from it (deleted), and an anchored head that differs from the event's recomputed
    hash (a rewritten chain).

    Raises:
        ConfigError: there is no anchor key, or it is malformed.
    """
    from sqlalchemy import select

    from dpops.ledger.schema import _DATASETS

    entries = log.lines()
    if not entries:
        return []
    key = log.key(create=False)
    ours = key_id(key)
    d = _DATASETS.c
    with ledger.engine.connect() as conn:
        datasets = {name: ds_id for ds_id, name in conn.execute(select(d.id, d.name))}
    chains: dict[str, tuple[dict[int, str], int]] = {}
    problems: list[str] = []
    foreign: dict[str, list[int]] = {}
    where = f"anchor log {log.path}"
    for n, line in entries:
        fields = _parse(line)
        if fields is None:
            problems.append(f"{where} line {n}: not a signed anchor (a torn write or an edited line)")
            continue
        if fields["key_id"] != ours:
            foreign.setdefault(fields["key_id"], []).append(n)
            continue
        if not hmac.compare_digest(_mac(key, fields), fields["mac"]):
            problems.append(f"{where} line {n}: bad MAC: the anchor was edited or forged")
            continue
        name, seq, head = fields["dataset"], fields["seq"], fields["head"]
        what = f"anchored at seq {seq} ({fields['kind']}, {fields['at']}; {where} line {n})"
        if name not in datasets:
            problems.append(f"dataset {name!r}: {what}, but the ledger holds no such dataset (deleted, or another ledger's log)")
            continue
        if name not in chains:
            chains[name] = _recomputed_chain(ledger, datasets[name], name)
        hashes, last = chains[name]
        if seq > last:
            problems.append(f"dataset {name!r}: {what}, but its chain ends at seq {last}: events were deleted from "
                            "its tail (truncated)")
        elif seq not in hashes:
            problems.append(f"dataset {name!r}: {what}, but its chain has no event {seq} (deleted)")
        elif not hmac.compare_digest(hashes[seq], head):
            problems.append(f"dataset {name!r}: {what} with hash {head[:16]}..., but event {seq} now hashes to "
                            f"{hashes[seq][:16]}...: the chain up to it was rewritten")
    for other, numbers in foreign.items():
        shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
        problems.append(f"{where}: line(s) {shown} are signed under key id {other}, not under this key (key id {ours}): "
                        f"a wrong {ANCHOR_KEY_ENV} or anchor.key, or forged lines")
    return problems
