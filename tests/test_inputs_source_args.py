"""How `clawrouter mcp` turns an agent's local paths into inputs for the gateway (`source_arg`).

Making a path absolute resolves its symlinks, which is file-system work: on a slow or hung disk
(a network mount) it must stall one call, not the MCP server's event loop and every other call
and the session's pings with it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from clawrouter.sandbox.images import make_png


def test_edit_image_makes_its_paths_absolute_off_the_event_loop(
        tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from clawrouter.agents import mcp_server

    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path / "client-home"))
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    photo.write_bytes(make_png(64, 64, seed=7))
    mask.write_bytes(make_png(64, 64, seed=8))
    where: list[str] = []
    real = mcp_server.source_arg

    def watched(value: str) -> str:  # the real thing, noting which thread runs it
        try:
            asyncio.get_running_loop()
            where.append("the event loop")
        except RuntimeError:
            where.append("a worker thread")
        return real(value)

    monkeypatch.setattr(mcp_server, "source_arg", watched)

    async def edit() -> Any:
        connection = mcp_server.Connection(gateway.url)
        server = mcp_server.build_server(connection, out=str(tmp_path / "out"))
        try:
            return await server.call_tool("edit_image", {
                "prompt": "make it snow", "image": str(photo), "mask": str(mask),
                "model": "gpt-image-1"})
        finally:
            await connection.aclose()

    result = asyncio.run(edit())
    assert not result.is_error, result
    assert where == ["a worker thread"] * 2
