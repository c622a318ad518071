"""clawrouter.inputs.paths against a file system that changes under it or names a folder twice.

Each test swaps real files and folders at the moment the code under test would be exposed
(after a path was resolved and before it is stat'ed or opened), or gives the data directory a
second name with a bind mount in a mount namespace of the test's own, so nothing here is a race.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from clawrouter.errors import InvalidRequest
from clawrouter.inputs import InputPolicy
from clawrouter.inputs import paths

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
CAP = 64 * 1024


@pytest.mark.parametrize("swap", ["folder", "file"])
def test_a_path_swapped_after_it_was_resolved_says_nothing_of_what_lies_outside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str) -> None:
    """Another local user who can write in a root swaps a folder (or the file) on the judged
    path for a symlink to something outside the roots, just after the path was resolved. The
    answer must be the same whether that target is a file too big, nothing, or a folder: else
    the answer describes a path the policy refused (its size, existence and kind)."""
    judge = paths._judged_path
    answers = {}
    for kind in ("big", "nil", "dir"):  # too big, missing, a folder (one length: one message)
        root, outside = tmp_path / kind / "root", tmp_path / kind / "outside"
        (root / "x").mkdir(parents=True)
        outside.mkdir()
        (root / "x" / "img.png").write_bytes(PNG)
        target = outside / "img.png"
        if kind == "big":
            with open(target, "wb") as sparse:
                sparse.truncate(10 * CAP)
        elif kind == "dir":
            target.mkdir()
        policy = InputPolicy(max_bytes=CAP, roots=(root,))

        def judged_then_swapped(*args: Any, root: Path = root, outside: Path = outside,
                                target: Path = target, **kwargs: Any) -> Path:
            real = judge(*args, **kwargs)
            if swap == "folder":
                (root / "x").rename(root / "was-x")
                (root / "x").symlink_to(outside)
            else:
                (root / "x" / "img.png").unlink()
                (root / "x" / "img.png").symlink_to(target)
            return real

        monkeypatch.setattr(paths, "_judged_path", judged_then_swapped)
        with pytest.raises(InvalidRequest) as refused:
            paths.judge_local_image(str(root / "x" / "img.png"), policy, cwd=root,
                                    param="image")
        monkeypatch.setattr(paths, "_judged_path", judge)
        error = refused.value
        answers[kind] = (error.code, error.message.replace(str(tmp_path / kind), "<tmp>"))
    assert len(set(answers.values())) == 1, answers
    code, message = answers["nil"]
    assert code == "path_refused" and "changed" in message, message


_READ_BY_ALIAS = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from clawrouter.errors import InvalidRequest
    from clawrouter.inputs import InputPolicy
    from clawrouter.inputs.paths import read_local_image

    root, data, alias = map(Path, sys.argv[1:4])
    if subprocess.run(["mount", "--bind", str(data), str(alias)]).returncode:
        print("cannot mount")
        sys.exit(0)
    policy = InputPolicy(max_bytes=1 << 20, roots=(root,), forbidden=(data,))
    for name in ("images/ab.png", "wallet.key", "images/missing.png"):
        try:
            read_local_image(str(alias / name), policy, cwd=root, param="image")
            print(name, "read")
        except InvalidRequest as refused:
            print(name, refused.code, refused.message)
""")


def test_the_data_directory_is_refused_by_any_of_its_names(tmp_path: Path) -> None:
    """A second name for the data directory that resolving symlinks does not undo (a bind
    mount here; a different letter case on a case-insensitive disk) is refused like its own
    name: by the folder's identity, not its name. Run in a mount namespace of its own."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private mount namespace")
    root = tmp_path / "home"
    data, alias = root / "ClawData", root / "clawdata"
    (data / "images").mkdir(parents=True)
    alias.mkdir()
    (data / "images" / "ab.png").write_bytes(PNG)
    (data / "wallet.key").write_text("0x" + "ab" * 32)
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount",
                          "--propagation", "private", sys.executable, "-c", _READ_BY_ALIAS,
                          str(root), str(data), str(alias)],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if run.returncode and "unshare" in run.stderr or "cannot mount" in run.stdout:
        pytest.skip(f"no private mount namespace here: {run.stderr.strip() or run.stdout}")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3, run.stdout
    for line in lines:  # "<name> <code> <message>", or "<name> read"
        _, code, *message = line.split(" ", 2)
        assert code == "path_refused" and "data directory" in message[0], run.stdout
        assert "0xabab" not in line


_OUT_OF_DESCRIPTORS = textwrap.dedent("""
    import resource, sys
    from clawrouter.errors import InvalidRequest
    from clawrouter.inputs import InputPolicy
    from clawrouter.inputs.paths import judge_local_image, read_judged
    from pathlib import Path

    root = Path(sys.argv[1])
    judged = judge_local_image(str(root / "img.png"), InputPolicy(max_bytes=1 << 20,
                               roots=(root,)), cwd=root, param="image")
    # stdin, stdout and stderr are open: no new descriptor can be had
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        read_judged(judged, param="image")
        print("read")
    except InvalidRequest as refused:
        print(refused.code, refused.message)
""")


def test_a_file_that_cannot_be_opened_is_not_said_to_have_changed(tmp_path: Path) -> None:
    """The refusal says why the open failed, and that the file changed only when it did (it
    is gone, or a folder on its way is a symlink now): an open that fails for want of
    descriptors (or permission) is not a file that changed."""
    (tmp_path / "img.png").write_bytes(PNG)
    run = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path)],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("path_refused image: cannot read"), run.stdout
    assert "Too many open files" in run.stdout and "change" not in run.stdout, run.stdout

    policy = InputPolicy(max_bytes=CAP, roots=(tmp_path,))
    judged = paths.judge_local_image(str(tmp_path / "img.png"), policy, cwd=tmp_path,
                                     param="image")
    (tmp_path / "img.png").unlink()
    with pytest.raises(InvalidRequest) as gone:
        paths.read_judged(judged, param="image")
    assert gone.value.code == "path_refused" and "changed" in gone.value.message
