"""How a refused input address is named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clawrouter.errors import InvalidRequest
from clawrouter.inputs import InputPolicy, InputResolver

MB = 1024 * 1024


def test_an_unspecified_address_is_named_with_the_right_article(tmp_path: Path) -> None:
    async def fetch() -> InvalidRequest:
        policy = InputPolicy(max_bytes=MB, roots=(tmp_path,))
        async with InputResolver(policy) as resolver:
            with pytest.raises(InvalidRequest) as refused:
                await resolver.resolve("http://0.0.0.0/cat.png", param="image")
        return refused.value

    error = asyncio.run(fetch())
    assert error.code == "url_refused" and "0.0.0.0 is an unspecified address" in error.message
