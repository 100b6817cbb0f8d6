"""Optional SQLite persistence (``COMFY_CLUSTER_STUN_DB``): membership survives a restart.

Without it the server is soft state and a restart heals within one heartbeat (every member gets
404, joins again and gets a new token).  With it, members, their tokens and reflexive addresses
are written on every membership change (never on a plain heartbeat: that would put a disk write
on the hottest path), and a restarted server gives each restored member one TTL to heartbeat.
The key hashes' salt is stored too, so that registration-created clusters keep their keys.
The file holds STUN tokens: it is created readable by its owner only.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from .registry import Cluster, Member, Registry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS clusters (
    cluster_id TEXT PRIMARY KEY, key_hash BLOB NOT NULL, declared INTEGER NOT NULL,
    world_size INTEGER);
CREATE TABLE IF NOT EXISTS members (
    cluster_id TEXT NOT NULL, instance_id TEXT NOT NULL, rank INTEGER NOT NULL, role TEXT,
    token BLOB NOT NULL, local TEXT NOT NULL, reflexive TEXT,
    PRIMARY KEY (cluster_id, instance_id));
"""


class SqliteStore:
    def __init__(self, path: str) -> None:
        Path(path).touch(mode=0o600, exist_ok=True)
        os.chmod(path, 0o600)
        # the event loop thread is the only writer; uvicorn may create the app in another
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def salt(self, fresh: bytes) -> bytes:
        """The stored key-hash salt, or ``fresh`` stored as it."""
        row = self._db.execute("SELECT v FROM meta WHERE k = 'salt'").fetchone()
        if row is not None:
            return bytes(row[0])
        self._db.execute("INSERT INTO meta (k, v) VALUES ('salt', ?)", (fresh,))
        return fresh

    def save_cluster(self, cluster: Cluster) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO clusters VALUES (?, ?, ?, ?)",
            (cluster.cluster_id, cluster.key_hash, int(cluster.declared), cluster.world_size),
        )

    def delete_cluster(self, cluster_id: str) -> None:
        self._db.execute("DELETE FROM clusters WHERE cluster_id = ?", (cluster_id,))
        self._db.execute("DELETE FROM members WHERE cluster_id = ?", (cluster_id,))

    def save_member(self, member: Member) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                member.cluster_id,
                member.instance_id,
                member.rank,
                member.role,
                member.token,
                json.dumps(member.local),
                json.dumps(member.reflexive) if member.reflexive else None,
            ),
        )

    def delete_member(self, cluster_id: str, instance_id: str) -> None:
        self._db.execute(
            "DELETE FROM members WHERE cluster_id = ? AND instance_id = ?",
            (cluster_id, instance_id),
        )

    def load(self, registry: Registry) -> int:
        """Fill ``registry`` (declared clusters already in it keep their configured key)."""
        for cid, key_hash, declared, world_size in self._db.execute("SELECT * FROM clusters"):
            if cid in registry.clusters:
                registry.clusters[cid].world_size = world_size
            elif not declared:
                cluster = Cluster(cid, bytes(key_hash), False, world_size)
                registry.clusters[cid] = cluster
        restored = 0
        for cid, iid, rank, role, token, local, reflexive in self._db.execute(
            "SELECT * FROM members"
        ):
            found = registry.clusters.get(cid)
            if found is None:
                continue  # a declared cluster since removed from the settings
            refl = tuple(json.loads(reflexive)) if reflexive else None
            member = Member(
                cid,
                iid,
                int(rank),
                role,
                bytes(token),
                [(str(h), int(p)) for h, p in json.loads(local)],
                0.0,
                reflexive=(str(refl[0]), int(refl[1])) if refl else None,
            )
            registry.restore(found, member)
            restored += 1
        return restored
