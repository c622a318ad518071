"""`clawrouter images ls|prune` on a real store in a temporary CLAWROUTER_HOME."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from clawrouter.sandbox.images import make_png
from clawrouter.store import ImageMeta, ImageStore


def run(home, *args):
    env = {**os.environ, "CLAWROUTER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "clawrouter", "images", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def fill(home, count: int) -> list[str]:
    async def put() -> list[str]:
        async with ImageStore(home / "images") as store:
            names = []
            for i in range(count):
                image = await store.put_bytes(make_png(32, 32, i), ImageMeta(
                    model="zai/cogview-4", prompt=f"picture {i}", size="512x512",
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
    assert text.stdout.count("/images/") == 2  # one path line per image


def test_ls_on_an_empty_home_says_so(tmp_path):
    done = run(tmp_path, "ls")
    assert done.returncode == 0 and "No images" in done.stdout


def test_prune_applies_the_size_limit(tmp_path):
    fill(tmp_path, 3)
    env_limit = {"CLAWROUTER_IMAGE_MAX_GB": str(1 / 1024**3)}  # one byte: everything goes
    done = subprocess.run([sys.executable, "-m", "clawrouter", "images", "prune", "--json"],
                          env={**os.environ, "CLAWROUTER_HOME": str(tmp_path), **env_limit},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and len(json.loads(done.stdout)["removed"]) == 3
    assert json.loads(run(tmp_path, "ls", "--json").stdout) == []


def test_a_bad_configuration_is_a_message_and_exit_2_not_a_traceback(tmp_path):
    (tmp_path / "config.toml").write_text('image_max_gb = "lots"\n')
    for command in ("ls", "prune"):
        proc = run(tmp_path, command)
        assert proc.returncode == 2, proc.stderr
        assert "invalid configuration: image_max_gb" in proc.stderr
        assert "Traceback" not in proc.stderr
