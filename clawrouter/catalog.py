"""The image model catalog: one declarative table that every part of the gateway reads.

Sources: BlockRun's model catalog 2026.09.29.1, its MCP server (newest edit/mask rules) and the
SDK price lists (see shared/reference/blockrun-api.md §7). Prices are list prices in USD per
image; BlockRun charges them ×1.05 on Base plus a flat fee per request. The 402 quote is what we
pay; this table only bounds it (estimate × tolerance) and feeds budgets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from clawrouter.errors import InvalidRequest, ModelNotFound

BASE_MARKUP = 1.05  # BlockRun's Base price = list price × 1.05
FEE_USD = 0.001  # flat x402 fee per request on Base
MICRO = 1_000_000  # USDC has 6 decimals


@dataclass(frozen=True)
class ImageModel:
    id: str
    aliases: tuple[str, ...]
    #: size ("WxH") -> list price in USD per image
    prices: dict[str, float]
    edits: bool = False
    max_images: int = 0  # source images per edit
    mask: bool = False
    status: Literal["live"] = "live"
    #: BlockRun answers 202 + poll for this model (the sandbox mimics it)
    slow: bool = False
    #: accepts `quality` upstream (every other model gets a 400 for it upstream)
    quality: bool = False
    #: BlockRun returns results as data: URIs rather than https URLs
    data_uri_results: bool = False
    note: str = ""

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.prices)

    @property
    def provider(self) -> str:
        return self.id.split("/", 1)[0]


@dataclass(frozen=True)
class Renamed:
    """A retired name that maps to a live model (ClawRouter v0.12.227 did the same)."""

    target: str
    #: sizes the old model had that the new one lacks -> nearest size the new one has
    sizes: dict[str, str] = field(default_factory=dict)


_GPT2 = {"1024x1024": 0.06, "1536x1024": 0.12, "1024x1536": 0.12}

MODELS: tuple[ImageModel, ...] = (
    ImageModel("google/nano-banana", ("nano-banana", "banana"), {"1024x1024": 0.05},
               edits=True, max_images=3, note="default; fast and reliable"),
    ImageModel("google/nano-banana-2", ("nano-banana-2", "banana-2"), {"1024x1024": 0.09},
               edits=True, max_images=3),
    ImageModel("google/nano-banana-pro", ("nano-banana-pro", "banana-pro"),
               {"1024x1024": 0.10, "2048x2048": 0.10, "4096x4096": 0.15},
               edits=True, max_images=3, note="highest quality, up to 4K"),
    ImageModel("openai/gpt-image-1", ("gpt-image", "gpt-image-1"),
               {"1024x1024": 0.02, "1536x1024": 0.04, "1024x1536": 0.04},
               edits=True, max_images=4, mask=True, data_uri_results=True,
               note="cheapest editor; masks"),
    ImageModel("openai/gpt-image-2", ("gpt-image-2",), _GPT2,
               edits=True, max_images=4, mask=True, slow=True, data_uri_results=True,
               note="best text in images; slow (202 + poll)"),
    ImageModel("openai/gpt-image-2.5-flare", (), {"1024x1024": 0.28, "1536x1024": 0.28,
               "1024x1536": 0.28}, slow=True, quality=True, data_uri_results=True,
               note="sizes not published; accepts quality"),
    ImageModel("openai/gpt-image-2.5-sunburst", (), {"1024x1024": 0.28, "1536x1024": 0.28,
               "1024x1536": 0.28}, slow=True, quality=True, data_uri_results=True,
               note="sizes not published; accepts quality"),
    ImageModel("bytedance/seedream-5-pro", ("seedream",),
               {"1024x1024": 0.045, "1280x720": 0.045, "2048x1024": 0.045,
                "2048x2048": 0.09, "2304x1728": 0.09, "2848x1600": 0.09}),
    ImageModel("xai/grok-imagine-image", ("grok-imagine",), {"1024x1024": 0.02}),
    ImageModel("xai/grok-imagine-image-2.0", (), {"1024x1024": 0.04}),
    # Catalog says $0.05; every SDK and ClawRouter say $0.07. Ceilings use the higher one.
    ImageModel("xai/grok-imagine-image-pro", ("grok-imagine-pro",), {"1024x1024": 0.07}),
    ImageModel("zai/cogview-4", ("cogview",),
               {"512x512": 0.015, "768x768": 0.015, "1024x1024": 0.015, "768x1344": 0.015,
                "1344x768": 0.015, "1440x1440": 0.02}, note="cheapest; Chinese prompts"),
)

_DALLE = Renamed("openai/gpt-image-2", {"1792x1024": "1536x1024", "1024x1792": "1024x1536"})
RENAMED: dict[str, Renamed] = {
    "dall-e-3": _DALLE, "dalle-3": _DALLE, "dalle3": _DALLE, "dalle": _DALLE, "dall-e": _DALLE,
    "openai/dall-e-3": _DALLE,
}

#: OpenAI's dated snapshot names (the openai SDK's `ImageModel`) of a model the catalog has:
#: aliases, kept out of the listings (BlockRun serves one version of each model)
SNAPSHOTS: dict[str, str] = {
    "gpt-image-2-2026-04-21": "openai/gpt-image-2",
    "gpt-image-2.5-flare-2026-09-08": "openai/gpt-image-2.5-flare",
    "gpt-image-2.5-sunburst-2026-09-08": "openai/gpt-image-2.5-sunburst",
}

#: OpenAI's own names for its GPT image models (the SDK's `ImageModel`), each also with a dated
#: snapshot suffix: OpenAI always answers them with `b64_json`, so code written for them reads
#: that (`openai_image_name`). Not our alias `gpt-image`, nor `openai/…` ids: BlockRun's names.
OPENAI_IMAGE_NAMES = frozenset({
    "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2",
    "gpt-image-2.5-sunburst", "gpt-image-2.5-flare", "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare", "chatgpt-image-latest",
})
#: OpenAI's other image model names, none of which BlockRun offers: unknown names whose 404
#: says so, as for an OPENAI_IMAGE_NAMES one the catalog lacks (OpenAI answers these `url`)
OTHER_OPENAI_NAMES = frozenset({"dall-e-2", "dalle-2", "dalle2", "openai/dall-e-2"})
_SNAPSHOT_DATE = re.compile(r"-[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")

_FLUX = ("Flux was dropped by BlockRun and is no longer available. Use 'nano-banana' "
         "(google/nano-banana) or 'seedream' (bytedance/seedream-5-pro) instead.")
DROPPED: dict[str, str] = {
    "flux": _FLUX, "flux-pro": _FLUX, "flux-1.1-pro": _FLUX, "black-forest/flux-1.1-pro": _FLUX,
    "flux-schnell": _FLUX, "together/flux-schnell": _FLUX,
}

DEFAULT_GENERATE_MODEL = "google/nano-banana"
DEFAULT_EDIT_MODEL = "openai/gpt-image-1"
DEFAULT_SIZE = "1024x1024"

BY_ID: dict[str, ImageModel] = {m.id: m for m in MODELS}


def _names() -> dict[str, ImageModel]:
    names: dict[str, ImageModel] = {}
    for model in MODELS:
        names[model.id] = model
        names[model.id.split("/", 1)[1]] = model  # bare id without the provider prefix
        for alias in model.aliases:
            names[alias] = model
    for snapshot, target in SNAPSHOTS.items():
        names[snapshot] = BY_ID[target]
    return names


_BY_NAME = _names()


@dataclass(frozen=True)
class Resolved:
    model: ImageModel
    renamed: Renamed | None = None

    def size(self, size: str) -> str:
        """Validate a size for this model (mapping a renamed model's old sizes)."""
        if self.renamed and size in self.renamed.sizes:
            size = self.renamed.sizes[size]
        if size not in self.model.prices:
            raise InvalidRequest(
                f"Size '{size}' is not available for {self.model.id}. "
                f"Allowed sizes: {', '.join(self.model.sizes)}.",
                param="size", code="invalid_size")
        return size


def resolve(name: str) -> Resolved:
    """Resolve an alias, bare id, full id or retired name (case-insensitive)."""
    key = name.strip().lower()
    for prefix in ("blockrun/",):
        key = key.removeprefix(prefix)
    if key in DROPPED:
        raise InvalidRequest(f"Model '{name}' was dropped. {DROPPED[key]}",
                             param="model", code="model_dropped")
    if key in RENAMED:
        renamed = RENAMED[key]
        return Resolved(BY_ID[renamed.target], renamed)
    model = _BY_NAME.get(key)
    if model is None:
        raise ModelNotFound(
            f"Unknown image model '{name}'.{_not_offered(name)} Available: "
            f"{', '.join(m.id for m in MODELS)} (aliases: "
            f"{', '.join(a for m in MODELS for a in m.aliases)}).",
            param="model")
    return Resolved(model)


def openai_image_name(name: str) -> bool:
    """Whether `name`, as the client sent it, is OpenAI's own for a GPT image model (or a
    dated snapshot of one): such a client expects `b64_json` when it asks for no format."""
    key = _SNAPSHOT_DATE.sub("", name.strip().lower())
    return key in OPENAI_IMAGE_NAMES


def _not_offered(name: str) -> str:
    """For an OpenAI model name BlockRun lacks: which of OpenAI's models it does have."""
    if not openai_image_name(name) and name.strip().lower() not in OTHER_OPENAI_NAMES:
        return ""
    ours = ", ".join(m.id for m in MODELS if m.provider == "openai")
    return f" It is an OpenAI model that BlockRun does not offer; its OpenAI models: {ours}."


def to_micro(usd: float) -> int:
    """USD -> atomic USDC, rounding up (a price estimate must never round down)."""
    return math.ceil(round(usd * MICRO, 6))


def limit_micro(usd: float) -> int:
    """A user's USD limit (a cap, a budget) in micro-USDC, rounded down: a limit must never
    allow more than configured. Every limit goes through here."""
    return max(0, math.floor(round(usd * MICRO, 6)))


def to_usd(micro: int) -> float:
    """Micro-USDC -> USD, as the JSON summaries and metrics carry it."""
    return round(micro / MICRO, 6)


def estimate_micro(model: ImageModel, size: str, n: int) -> int:
    """What BlockRun should quote on Base: list price × 1.05 × n + the flat fee."""
    return to_micro(model.prices[size] * BASE_MARKUP * n) + to_micro(FEE_USD)


def ceiling_micro(model: ImageModel, size: str, n: int, tolerance: float) -> int:
    """The most we will sign for this request: the estimate × tolerance, plus the fee."""
    return to_micro(model.prices[size] * BASE_MARKUP * n * tolerance) + to_micro(FEE_USD)


def format_dollars(usd: float) -> str:
    """`format_usd` for an amount in dollars (as the JSON summaries carry them)."""
    return format_usd(round(usd * MICRO))


def format_usd(micro: int) -> str:
    """$0.0525 style: at least cents, at most micro-dollars, no trailing zeros."""
    whole, frac = f"{micro / MICRO:.6f}".split(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"
