"""`clawrouter images ls|prune` on a real store in a temporary CLAWROUTER_HOME, run by
`clawrouter.cli.main` in this process (nothing here is about the process boundary)."""

from __future__ import annotations

import asyncio
import json
import os

from clawrouter.sandbox.images import make_png
from clawrouter.store import ImageMeta, ImageStore
from tests.servers import clawrouter_in_process


def run(home, *args, **env):
    return clawrouter_in_process("images", *args,
                                 env={**os.environ, "CLAWROUTER_HOME": str(home), **env})


def fill(home, count: int, prompt: str = "picture {i}") -> list[str]:
    async def put() -> list[str]:
        async with ImageStore(home / "images") as store:
            names = []
            for i in range(count):
                image = await store.put_bytes(make_png(32, 32, i), ImageMeta(
                    model="zai/cogview-4", prompt=prompt.format(i=i), size="512x512",
                    cost_micro=16_750))
                names.append(image.name)
            return names

    return asyncio.run(put())


def test_ls_lists_newest_first_with_metadata(tmp_path):
    names = fill(tmp_path, 3)
    listed = json.loads(run(tmp_path, "ls", "--json").stdout)
    assert {row["name"] for row in listed} == set(names)
    assert listed[0]["prompt"] == "picture 2" and listed[0]["cost_micro"] == 16_750
    text = run(tmp_path, "ls", "--limit", "2")
    assert text.returncode == 0 and "picture 2" in text.stdout and "picture 0" not in text.stdout
    assert "$0.01675" in text.stdout  # what was paid, to the micro-dollar
    assert text.stdout.count("/images/") == 2  # one path line per image
    past = run(tmp_path, "ls", "--offset", "3")
    assert past.returncode == 0 and past.stdout == "No images past the first 3.\n"
    for bad in (["--limit", "0"], ["--limit", "-1"], ["--offset", "-1"], ["--limit", "x"]):
        refused = run(tmp_path, "ls", *bad)
        assert refused.returncode == 2, bad
        assert "invalid count value" in refused.stderr or "must be" in refused.stderr, bad


def test_ls_shows_a_prompt_as_plain_text_never_as_terminal_commands(tmp_path):
    """A prompt is whatever an agent relayed: escapes in it (a clipboard write, a cleared
    screen) must not reach the terminal; `--json` keeps it as it is."""
    fill(tmp_path, 1, prompt="cat\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\x9bhidden {i}")
    shown = run(tmp_path, "ls").stdout
    assert "cat" in shown and "hidden 0" in shown
    assert not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) <= 0x9f for c in shown)
    assert "\x1b[2J" in json.loads(run(tmp_path, "ls", "--json").stdout)[0]["prompt"]


def test_ls_on_an_empty_home_says_so(tmp_path):
    done = run(tmp_path, "ls")
    assert done.returncode == 0 and "No images" in done.stdout


def test_prune_applies_the_size_limit(tmp_path):
    fill(tmp_path, 3)
    env_limit = {"CLAWROUTER_IMAGE_MAX_GB": str(1 / 1024**3)}  # one byte: everything goes
    done = run(tmp_path, "prune", "--json", **env_limit)
    assert done.returncode == 0 and len(json.loads(done.stdout)["removed"]) == 3
    assert json.loads(run(tmp_path, "ls", "--json").stdout) == []


def test_a_bad_configuration_is_a_message_and_exit_2_not_a_traceback(tmp_path):
    (tmp_path / "config.toml").write_text('image_max_gb = "lots"\n')
    for command in ("ls", "prune"):
        proc = run(tmp_path, command)
        assert proc.returncode == 2, proc.stderr
        assert "invalid configuration: image_max_gb" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_prune_refuses_while_a_gateway_uses_the_data_directory(tmp_path):
    """A gateway keeps an index and a cache of the store: files deleted behind it would still
    be served from memory, and new identical images would get URLs to nothing."""
    from clawrouter.config import Settings
    from clawrouter.payment.ledger import Ledger

    fill(tmp_path, 2)
    limit = {"CLAWROUTER_IMAGE_MAX_GB": str(1 / 1024**3)}
    with Ledger(Settings(home=tmp_path).ledger_path_for("base-sepolia")):  # a gateway holds it
        done = run(tmp_path, "prune", **limit)
    assert done.returncode == 1 and "Stop it to prune now" in done.stderr
    assert len(json.loads(run(tmp_path, "ls", "--json").stdout)) == 2


def test_ls_reads_the_store_as_it_is_and_changes_nothing(tmp_path):
    """`ls` may run beside a gateway that is writing the store: it reconciles nothing (an open
    store would drop a row whose file it had not seen yet)."""
    names = fill(tmp_path, 2)
    (tmp_path / "images" / names[0]).unlink()  # as if its file were not written yet
    assert len(json.loads(run(tmp_path, "ls", "--json").stdout)) == 2
    assert len(json.loads(run(tmp_path, "ls", "--json").stdout)) == 2  # its row is still there
