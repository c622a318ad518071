"""Request bodies at the edge, as OpenAI and ClawRouter clients send them.

Unknown fields are accepted (the SDK's `extra_body` and newer SDK fields arrive as-is) and never
forwarded; `null` means unset everywhere.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator,
)

MAX_PROMPT_CHARS = 32_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: StrictStr
    model: StrictStr | None = None
    size: StrictStr | None = None
    n: StrictInt | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: StrictStr | None = None
    stream: StrictBool | None = None
    # Accepted for compatibility, never forwarded (BlockRun has no such fields).
    style: StrictStr | None = None
    user: StrictStr | None = None
    background: StrictStr | None = None  # the values validate.UNSUPPORTED_VALUES accepts
    output_format: StrictStr | None = None
    output_compression: Annotated[StrictInt, Field(ge=0, le=100)] | None = None  # OpenAI's
    moderation: StrictStr | None = None
    partial_images: Annotated[StrictInt, Field(ge=0, le=3)] | None = None  # ranges

    @field_validator("response_format", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value


class GenerationBody(_Body):
    """`POST /v1/images/generations`."""


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    image_url: StrictStr | None = None
    file_id: StrictStr | None = None


class EditBody(_Body):
    """`POST /v1/images/image2image` (ClawRouter) and JSON `POST /v1/images/edits` (OpenAI)."""

    image: StrictStr | list[StrictStr] | None = None
    images: list[ImageURL | StrictStr] | None = None  # OpenAI's JSON edit shape
    mask: StrictStr | ImageURL | None = None
