"""What the input resolver may read and fetch: one frozen value built from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings


@dataclass(frozen=True)
class InputPolicy:
    """Limits for turning image inputs into bytes.

    `roots` are the folders local paths may point into (judged after resolving symlinks);
    `forbidden` folders are refused even inside a root — the gateway's own data directory holds
    the wallet key. `allow_private_urls` switches the URL address check off for LAN fetching.
    """

    max_bytes: int
    roots: tuple[Path, ...]
    forbidden: tuple[Path, ...] = ()
    allow_local_files: bool = True
    allow_private_urls: bool = False
    connect_timeout: float = 5.0
    total_timeout: float = 30.0
    max_redirects: int = 3
    cwd: Path | None = None  # base for relative paths; None = os.getcwd(), when one needs it

    @classmethod
    def from_settings(cls, settings: "Settings") -> "InputPolicy":
        return cls(
            max_bytes=settings.max_image_bytes,
            roots=tuple(settings.roots),
            forbidden=(settings.home,),
            allow_local_files=settings.local_files_allowed,
            allow_private_urls=settings.allow_private_urls,
        )
