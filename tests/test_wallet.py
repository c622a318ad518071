import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clawrouter.payment.wallet import WalletError, load_wallet

KEY = "0x" + "11" * 32


def test_environment_key_wins(tmp_path):
    (tmp_path / "wallet.key").write_text("0x" + "22" * 32)
    wallet = load_wallet(tmp_path, KEY)
    assert wallet.key == KEY and wallet.source == "env"


def test_new_key_is_created_private_and_reused(tmp_path):
    first = load_wallet(tmp_path, None)
    path = tmp_path / "wallet.key"
    assert first.source == "created"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_wallet(tmp_path, None)
    assert again.source == "file" and again.key == first.key
    assert first.key not in repr(first)


def test_a_key_file_others_can_read_is_made_private(tmp_path, caplog):
    path = tmp_path / "wallet.key"
    path.write_text(KEY + "\n")
    path.chmod(0o644)
    assert load_wallet(tmp_path, None).key == KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "now 600" in caplog.text and KEY not in caplog.text


def test_a_broken_link_where_the_key_file_goes_is_a_clear_error(tmp_path):
    (tmp_path / "wallet.key").symlink_to(tmp_path / "gone")
    with pytest.raises(WalletError, match="broken link"):
        load_wallet(tmp_path, None)
    assert not (tmp_path / "gone").exists()  # never followed


@pytest.mark.parametrize("bad", ["0x1234", "11" * 31, "0x" + "11" * 33, "0x0x" + "11" * 32,
                                 "0x" + "zz" * 32, "0x" + "00" * 32, "00" * 32,
                                 "0x" + "ff" * 32])  # at or above the curve's order
def test_malformed_keys_are_clear_errors_that_never_echo_the_key(tmp_path, bad):
    with pytest.raises(WalletError) as err:
        load_wallet(tmp_path, bad)
    assert "BLOCKRUN_WALLET_KEY" in str(err.value) and bad not in str(err.value)
    (tmp_path / "wallet.key").write_text(bad)
    with pytest.raises(WalletError, match="wallet.key"):
        load_wallet(tmp_path, None)


def test_a_key_is_taken_with_or_without_0x_from_either_place(tmp_path):
    """Wallets export keys both ways; one spelling (`0x` + 64 hex) is what the rest reads."""
    bare = KEY.removeprefix("0x")
    assert load_wallet(tmp_path, f" {bare}\n").key == KEY
    (tmp_path / "wallet.key").write_text(bare + "\n")
    (tmp_path / "wallet.key").chmod(0o600)
    assert load_wallet(tmp_path, None).key == KEY


def _load_in_rounds(homes: list[str], barrier, results) -> None:
    """One of two racing processes: each round, both load the wallet of a fresh home at once."""
    for home in homes:
        barrier.wait()
        try:
            results.put((home, load_wallet(Path(home), None).key))
        except Exception as exc:  # reported to the test, which fails on it
            results.put((home, f"error: {exc}"))


def test_two_processes_creating_the_first_key_agree_on_it(tmp_path):
    """Two gateways (or a gateway and `wallet create`) starting together on a new machine: the
    loser of the race reads the winner's complete key, never a half-written or empty file."""
    ctx = multiprocessing.get_context("spawn")
    rounds = 40
    homes = [str(tmp_path / f"home{i}") for i in range(rounds)]
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_load_in_rounds, args=(homes, barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        seen: dict[str, set[str]] = {}
        for _ in range(2 * rounds):
            home, got = results.get(timeout=60)
            seen.setdefault(home, set()).add(got)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    for home, keys in seen.items():
        (key,) = keys  # the same key for both
        assert not key.startswith("error"), (home, key)
        assert (Path(home) / "wallet.key").read_text() == key + "\n"
        assert [p.name for p in Path(home).iterdir()] == ["wallet.key"]  # no temp file left


def test_key_drafts_a_crash_left_behind_are_removed(tmp_path):
    """A creator killed between writing its draft and linking it leaves a file holding a
    private key: the next load removes it once it is clearly not a live creator's."""
    old = tmp_path / ".wallet.key.new-123-abcd"
    old.write_text("0x" + "11" * 32 + "\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    young = tmp_path / ".wallet.key.new-456-ef01"  # another process creating right now
    young.write_text("0x" + "22" * 32 + "\n")
    load_wallet(tmp_path, None)
    assert not old.exists() and young.exists() and (tmp_path / "wallet.key").exists()


def test_a_replacement_killed_before_its_swap_leaves_a_draft_the_next_load_removes(tmp_path):
    """`wallet import --force` writes the new key under a temporary name, then swaps it in.
    Killed in between, it leaves a file holding a private key; it must be a draft that the
    next load removes, and the old key must still be in place."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from clawrouter.cli import wallet\n"
        "wallet.os.replace = lambda src, dst: os._exit(9)\n"
        "wallet.replace_key_file(Path(sys.argv[1]), '0x' + '33' * 32)\n")
    path = tmp_path / "wallet.key"
    path.write_text(KEY + "\n")
    died = subprocess.run([sys.executable, "-c", script, str(path)], timeout=60)
    assert died.returncode == 9
    (left,) = [p for p in tmp_path.iterdir() if p.name != "wallet.key"]
    assert left.read_text() == "0x" + "33" * 32 + "\n"
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    assert load_wallet(tmp_path, None).key == KEY
    assert [p.name for p in tmp_path.iterdir()] == ["wallet.key"]
