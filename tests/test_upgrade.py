"""Upgrades keep what the user had: a data directory written by an older clawrouter (its
ledger, image index and images, its wallet key) opened by this one keeps every payment,
counted as before, every image at its old URL, and the same wallet; a data file written by
a newer clawrouter is refused in one line and left as it was.

The old files are made here from the SQL those versions wrote (ledger schema 1, 2 and the
first 3, the image index as first released), not by running old revisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import pytest
from eth_account import Account

from clawrouter.payment.ledger import Ledger, LedgerUnusable
from clawrouter.payment.ledgerdb import COLUMNS, STATUSES
from clawrouter.store.db import MetadataDB
from clawrouter.store.files import content_id
from tests.servers import clawrouter_command, clawrouter_in_process, free_port

SEPOLIA = "eip155:84532"
PAYEE = "0xe9030014F5DAe217d0A152f02A043567b16c1aBf"

_V1_COLUMNS = f"""
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL    NOT NULL,
    request_id    TEXT    NOT NULL,
    route         TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    size          TEXT    NOT NULL,
    n             INTEGER NOT NULL CHECK (n >= 1),
    amount        INTEGER NOT NULL CHECK (amount > 0),
    payee         TEXT    NOT NULL,
    network       TEXT    NOT NULL,
    nonce         TEXT    NOT NULL UNIQUE,
    status        TEXT    NOT NULL CHECK (status IN {STATUSES!r}),
    "transaction" TEXT,
    latency_ms    REAL,
    note          TEXT,
    attempt       INTEGER NOT NULL CHECK (attempt IN (1, 2))"""
_INDEXES = """
CREATE INDEX payments_time ON payments (time);
CREATE INDEX payments_status ON payments (status);"""
#: each released ledger schema, as its version wrote it: 1, 2 (payer, valid_before), and 3
#: before `unspendable` (the version number did not change when that column came)
OLD_LEDGERS = {
    1: f"CREATE TABLE payments ({_V1_COLUMNS}\n);{_INDEXES}\nPRAGMA user_version = 1;",
    2: f"CREATE TABLE payments ({_V1_COLUMNS},\n    payer TEXT,\n    valid_before INTEGER\n);"
       f"{_INDEXES}\nPRAGMA user_version = 2;",
    3: f"CREATE TABLE payments ({_V1_COLUMNS},\n    payer TEXT,\n    valid_before INTEGER,\n"
       f"    idempotency TEXT\n);{_INDEXES}\nCREATE INDEX payments_idempotency ON payments "
       "(idempotency) WHERE idempotency IS NOT NULL;\nPRAGMA user_version = 3;",
}
#: the image index as first released (it had no version number)
OLD_INDEX = """
CREATE TABLE images (
    id TEXT PRIMARY KEY, ext TEXT NOT NULL, content_type TEXT NOT NULL,
    bytes INTEGER NOT NULL, created REAL NOT NULL, last_served REAL, model TEXT, prompt TEXT,
    size TEXT, cost_micro INTEGER, request_id TEXT, source TEXT);
CREATE INDEX images_by_created ON images (created);
CREATE TABLE pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT, url TEXT NOT NULL, model TEXT, prompt TEXT,
    size TEXT, cost_micro INTEGER, request_id TEXT, created REAL NOT NULL,
    attempts INTEGER NOT NULL, next_attempt REAL, last_error TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'failed')));
"""

#: (status, amount, transaction) of the rows an old run left, one of every status
OLD_ROWS = [("settled", 50_000, "0x" + "ab" * 32), ("failed_after_payment", 20_000, None),
            ("rejected", 30_000, None), ("signed", 40_000, None), ("unknown", 10_000, None)]
#: what the budgets count of them: every row but the refusal (long expired in every schema)
COUNTED = 120_000


def old_ledger(path: Path, version: int, *, when: float, rows=OLD_ROWS,
               valid_before: int | None = None) -> None:
    """A ledger as clawrouter schema `version` left it, holding `rows`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as old:
        old.executescript(OLD_LEDGERS[version])
        for i, (status, amount, tx) in enumerate(rows):
            extra = {} if version == 1 else {"payer": "0x" + "11" * 20,
                                             "valid_before": valid_before or int(when) + 300}
            values = dict(time=when + i, request_id=f"req_{i}",
                          route="/v1/images/generations", model="google/nano-banana",
                          size="1024x1024", n=1, amount=amount, payee=PAYEE, network=SEPOLIA,
                          nonce=f"0x{i:064x}", status=status, transaction=tx, attempt=1,
                          **extra)
            names = ", ".join(f'"{k}"' for k in values)
            old.execute(f"INSERT INTO payments ({names}) VALUES "
                        f"({', '.join('?' * len(values))})", tuple(values.values()))
        old.commit()


def columns(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as raw:
        return [row[1] for row in raw.execute("PRAGMA table_info(payments)")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the ledger ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", sorted(OLD_LEDGERS))
def test_every_old_ledger_keeps_each_payment_and_its_count(tmp_path: Path, version: int):
    path = tmp_path / "ledger.sqlite3"
    old_ledger(path, version, when=time.time() - 3600, valid_before=int(time.time()) - 3600)
    with Ledger(path, chain_network=SEPOLIA) as ledger:
        kept = [(p.status, p.amount, p.transaction) for p in reversed(ledger.payments())]
        assert ledger.spent() == COUNTED and ledger.held() == []
        summary = ledger.summary()
    # the row a crash left in flight is now `unknown`: still counted, and asked of the chain
    assert kept == [(s if s != "signed" else "unknown", a, t) for s, a, t in OLD_ROWS]
    assert (summary["total"]["micro"], summary["total"]["pending"]["micro"]) == (50_000, 70_000)
    assert columns(path) == [c.strip().strip('"') for c in COLUMNS.split(",")] + ["unspendable"]


def test_a_migration_cut_short_is_done_again_whole(tmp_path: Path):
    """Each step of a migration once committed by itself, and `_migrate` goes by the columns
    it finds: cut short after adding `unspendable`, the next start skipped marking the old
    refusals final, and one that expired within the day counted for a day more."""
    path = tmp_path / "ledger.sqlite3"
    when = time.time() - 1800
    old_ledger(path, 2, when=when, rows=[("rejected", 30_000, None)],
               valid_before=int(when) + 300)
    with closing(sqlite3.connect(path)) as raw:  # the migration's update fails (a crash, say)
        raw.execute("CREATE TRIGGER cut BEFORE UPDATE ON payments "
                    "BEGIN SELECT RAISE(ABORT, 'cut short'); END")
    with pytest.raises(sqlite3.IntegrityError, match="cut short"):
        Ledger(path, chain_network=SEPOLIA)
    assert "unspendable" not in columns(path)  # nothing of it stayed
    with closing(sqlite3.connect(path)) as raw:
        raw.execute("DROP TRIGGER cut")
    with Ledger(path, chain_network=SEPOLIA) as ledger:
        assert ledger.spent() == 0 and ledger.held() == []
        assert ledger._conn.execute("SELECT unspendable FROM payments").fetchall() == [(1,)]


def test_a_newer_ledger_is_refused_and_left_as_it_was(tmp_path: Path):
    """A downgrade: the older version says so in one line, and writes nothing to the newer
    file (not even its journal mode) that the newer version would then misread."""
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as newer:
        newer.executescript("CREATE TABLE payments (id INTEGER PRIMARY KEY, refunded INTEGER);"
                            "PRAGMA user_version = 4;")
    before = digest(path)
    with pytest.raises(LedgerUnusable, match="written by a newer clawrouter .schema 4"):
        Ledger(path)
    assert digest(path) == before and not Path(f"{path}-wal").exists()


# --- the image index ----------------------------------------------------------------------

def old_store(images: Path, data: bytes, **meta: Any) -> str:
    """An image as the first release stored it: its file, and its row in an unversioned
    index. Returns its public name."""
    images.mkdir(parents=True, exist_ok=True)
    name = f"{content_id(data)}.png"
    (images / name).write_bytes(data)
    with closing(sqlite3.connect(images / "index.sqlite3")) as old:
        old.executescript(OLD_INDEX)
        old.execute("INSERT INTO images (id, ext, content_type, bytes, created, model, prompt,"
                    " size, cost_micro, request_id, source) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (name[:-4], "png", "image/png", len(data), time.time() - 60,
                     meta["model"], meta["prompt"], "1024x1024", meta["cost_micro"], "req_0",
                     "b64"))
        old.commit()
    return name


def test_a_newer_image_index_is_refused_in_one_line_not_rebuilt(tmp_path: Path):
    """Not taken for damage (moved aside and rebuilt: its prompts and costs lost to the
    version that wrote them), nor written to."""
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    name = old_store(tmp_path / "images", png, model="zai/cogview-4", prompt="p",
                     cost_micro=16_750)
    index = tmp_path / "images" / "index.sqlite3"
    with closing(sqlite3.connect(index)) as newer:
        newer.execute("PRAGMA user_version = 2")
    before = digest(index)
    shown = clawrouter_in_process("images", "ls", env={**os.environ,
                                                        "CLAWROUTER_HOME": str(tmp_path)})
    assert shown.returncode == 2 and shown.stdout == ""
    assert shown.stderr == (f"clawrouter: image index {index} was written by a newer clawrouter"
                            " (version 2, this one knows 1): upgrade clawrouter to use it (the "
                            "images stay as they are)\n")
    as_json = clawrouter_in_process("images", "ls", "--json",
                                    env={**os.environ, "CLAWROUTER_HOME": str(tmp_path)})
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["error"]["code"] == "index_unusable"
    assert digest(index) == before
    assert sorted(p.name for p in index.parent.iterdir()) == sorted([name, index.name])


def test_serve_refuses_a_newer_image_index_in_one_line_before_making_a_wallet(tmp_path: Path):
    """The store opens its index once the server runs, where a failure used to end in
    uvicorn's traceback (exit 3), after a first start had made a wallet it never announced."""
    (tmp_path / "images").mkdir(mode=0o700)
    with closing(sqlite3.connect(tmp_path / "images" / "index.sqlite3")) as newer:
        newer.execute("PRAGMA user_version = 2")
    env = {k: v for k, v in os.environ.items() if k != "BLOCKRUN_WALLET_KEY"}
    run = subprocess.run(clawrouter_command("serve", "--sandbox", "--port", str(free_port())),
                         env={**env, "CLAWROUTER_HOME": str(tmp_path)}, capture_output=True,
                         text=True, timeout=60)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith("clawrouter: image index ") and run.stderr.count("\n") == 1
    assert "written by a newer clawrouter" in run.stderr
    assert not (tmp_path / "wallet.key").exists()


def test_an_old_image_index_is_stamped_with_its_version(tmp_path: Path):
    old_store(tmp_path, b"\x89PNG\r\n\x1a\n" + os.urandom(200), model="m", prompt="p",
              cost_micro=1)
    db = MetadataDB(tmp_path / "index.sqlite3")
    db.open()
    try:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert [row["prompt"] for row in db.list_images(10, 0)] == ["p"]
    finally:
        db.close()


# --- a whole data directory, through the gateway --------------------------------------------

def test_a_gateway_on_an_old_data_directory_keeps_wallet_money_and_images(
        tmp_path: Path, make_gateway: Callable[..., Any]):
    """What the user sees after upgrading: the same wallet, every payment in /v1/spend and
    counted by the budgets, every image at its old URL and in the gallery's list."""
    from tests.conftest import gateway_settings

    home = tmp_path / "home"
    key = Account.create()
    home.mkdir()
    (home / "wallet.key").write_text(key.key.to_0x_hex() + "\n")
    (home / "wallet.key").chmod(0o600)
    ledger_path = gateway_settings(home, "http://127.0.0.1:1/api").ledger_path
    old_ledger(ledger_path, 1, when=time.time() - 600)
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(500)
    name = old_store(home / "images", png, model="google/nano-banana", prompt="an old fox",
                     cost_micro=50_000)
    # room for one more image (53,500) on top of what the old rows count, not for two
    gw = make_gateway(home=home, wallet_key=None, max_usd_total=(COUNTED + 60_000) / 1e6)
    assert gw.gw.address == key.address
    spend = gw.http.get("/v1/spend", params={"latest": 10}).json()
    assert (spend["total"]["micro"], spend["total"]["pending"]["micro"]) == (50_000, 70_000)
    assert sorted(row["status"] for row in spend["latest"]) == sorted(
        ["settled", "failed_after_payment", "rejected", "unknown", "unknown"])
    served = gw.http.get(f"/images/{name}")
    assert served.status_code == 200 and served.content == png
    (listed,) = gw.http.get("/v1/images").json()["data"]
    assert (listed["name"], listed["prompt"], listed["cost_micro"]) == (name, "an old fox",
                                                                        50_000)
    first = gw.http.post("/v1/images/generations", json={
        "model": "nano-banana", "prompt": "a new fox", "response_format": "url"})
    assert first.status_code == 200, first.text
    second = gw.http.post("/v1/images/generations", json={
        "model": "nano-banana", "prompt": "another new fox", "response_format": "url"})
    assert second.status_code == 402 and second.json()["error"]["code"] == "budget_exceeded"
