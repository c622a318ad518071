"""Check a request completely before anything is sent upstream or paid.

Each refusal is a 400 (404 for an unknown model) whose `param` names the field and whose
message lists what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clawrouter import catalog
from clawrouter.api.schemas import MAX_PROMPT_CHARS, EditBody, GenerationBody, ImageURL
from clawrouter.catalog import ImageModel, Resolved
from clawrouter.errors import InvalidRequest

Route = Literal["generations", "image2image"]
UPSTREAM_PATHS: dict[Route, str] = {
    "generations": "/v1/images/generations",
    "image2image": "/v1/images/image2image",
}
MAX_N = 10


@dataclass(frozen=True)
class SourceImage:
    """One image input as the client gave it (resolved to bytes later, by `inputs`)."""

    param: str  # "image", "image[1]", "mask"
    value: str | bytes  # URL, path, data URI, raw base64 — or uploaded bytes


@dataclass(frozen=True)
class ImageJob:
    route: Route
    resolved: Resolved
    prompt: str
    size: str
    n: int
    response_format: Literal["url", "b64_json"]
    stream: bool = False
    quality: str | None = None  # forwarded only to models that take it
    images: list[SourceImage] = field(default_factory=list)
    mask: SourceImage | None = None

    @property
    def model(self) -> ImageModel:
        return self.resolved.model

    @property
    def upstream_path(self) -> str:
        return UPSTREAM_PATHS[self.route]

    @property
    def sources(self) -> list[SourceImage]:
        """Every image input, the mask last."""
        return [*self.images, self.mask] if self.mask else list(self.images)


def _common(body: GenerationBody | EditBody, default_model: str, default_format: str):
    prompt = body.prompt.strip()
    if not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt",
                             code="invalid_prompt")
    if len(body.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"'prompt' is {len(body.prompt)} characters; the most is "
                             f"{MAX_PROMPT_CHARS}.", param="prompt", code="prompt_too_long")
    resolved = catalog.resolve(body.model or default_model)
    size_asked = body.size or catalog.DEFAULT_SIZE
    if size_asked == "auto":
        size_asked = resolved.model.sizes[0]
    size = resolved.size(size_asked)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}; got {n}.", param="n",
                             code="invalid_n")
    fmt = body.response_format or default_format
    return resolved, body.prompt, size, n, fmt


def generation_job(body: GenerationBody, default_format: str = "url") -> ImageJob:
    resolved, prompt, size, n, fmt = _common(body, catalog.DEFAULT_GENERATE_MODEL, default_format)
    return ImageJob("generations", resolved, prompt, size, n, fmt, bool(body.stream),
                    body.quality if resolved.model.quality else None)


def _sources(body: EditBody) -> list[SourceImage]:
    if body.image is not None and body.images is not None:
        raise InvalidRequest("Send the source images as 'image' or as 'images', not both.",
                             param="images")
    if body.images is not None:
        values = []
        for i, item in enumerate(body.images):
            value = item.image_url if isinstance(item, ImageURL) else item
            if not value:
                raise InvalidRequest("Each entry of 'images' needs an 'image_url' (uploaded "
                                     "file ids are not supported).", param=f"images[{i}]")
            values.append((f"images[{i}]", value))
    elif isinstance(body.image, list):
        values = [(f"image[{i}]", v) for i, v in enumerate(body.image)]
    elif body.image is not None:
        values = [("image", body.image)]
    else:
        values = []
    return [SourceImage(param, value) for param, value in values]


def edit_job(body: EditBody, *, uploads: list[SourceImage] | None = None,
             mask_upload: SourceImage | None = None, default_format: str = "url") -> ImageJob:
    """`uploads` are a multipart form's images, files and text fields alike, already named by
    their place in the form (`api/images.py`); a JSON body's are in `body`."""
    resolved, prompt, size, n, fmt = _common(body, catalog.DEFAULT_EDIT_MODEL, default_format)
    model = resolved.model
    sources = (uploads or []) + _sources(body)
    if not sources:
        raise InvalidRequest("An edit needs at least one source image in 'image'.",
                             param="image", code="missing_image")
    if not model.edits:
        editors = ", ".join(m.id for m in catalog.MODELS if m.edits)
        raise InvalidRequest(f"{model.id} cannot edit images. Models that edit: {editors}.",
                             param="model", code="model_cannot_edit")
    if len(sources) > model.max_images:
        raise InvalidRequest(f"{model.id} takes at most {model.max_images} source images; got "
                             f"{len(sources)}.", param="image", code="too_many_images")
    mask = mask_upload
    if body.mask is not None:
        value = body.mask.image_url if isinstance(body.mask, ImageURL) else body.mask
        if not value:  # never edit without the mask that was asked for
            raise InvalidRequest("'mask' needs an image: a data URI, base64, a URL or a path "
                                 "(as a string or an 'image_url'; uploaded file ids are not "
                                 "supported).", param="mask")
        mask = SourceImage("mask", value)
    if mask is not None:
        if not model.mask:
            maskers = ", ".join(m.id for m in catalog.MODELS if m.mask)
            raise InvalidRequest(f"{model.id} does not take a mask. Models that do: {maskers}.",
                                 param="mask", code="mask_not_supported")
        if len(sources) != 1:
            raise InvalidRequest("A mask can only be used with a single source image.",
                                 param="mask", code="mask_needs_one_image")
    return ImageJob("image2image", resolved, prompt, size, n, fmt, bool(body.stream),
                    body.quality if model.quality else None, sources, mask)
