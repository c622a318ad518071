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

#: OpenAI fields that change what is made, which BlockRun cannot honour: refused, not dropped
#: (every other unknown field is accepted and not forwarded), so nobody pays for an edit made
#: without what they asked for
UNSUPPORTED: dict[str, str] = {
    "markup": "a markup image (an overlay that guides an OpenAI gpt-image-2.5 edit); describe "
              "the change in the prompt instead, or use 'mask' with a model that takes one",
}


#: OpenAI fields accepted (and not forwarded) only with the values that ask for nothing
#: BlockRun does not do anyway: any other value would be paid for and not honoured, so it is
#: refused, as UNSUPPORTED's fields are. Field -> (the values accepted, why no other is)
UNSUPPORTED_VALUES: dict[str, tuple[tuple[str, ...], str]] = {
    "background": (("auto", "opaque"), "BlockRun's models return opaque images"),
}


def unsupported(name: str) -> InvalidRequest:
    return InvalidRequest(f"'{name}' is not supported: BlockRun's image API does not take "
                          f"{UNSUPPORTED[name]}.", param=name, code="unsupported_parameter")


def unsupported_value(name: str, value: str) -> InvalidRequest:
    """`unsupported_value`, not `unsupported_parameter`: the field itself is accepted, with
    the values that change nothing."""
    accepted, why = UNSUPPORTED_VALUES[name]
    return InvalidRequest(f"{name}={value[:40]!r} is not supported: {why}; "
                          f"{', '.join(repr(v) for v in accepted)} or null are accepted.",
                          param=name, code="unsupported_value")


@dataclass(frozen=True)
class SourceImage:
    """One image input as the client gave it (resolved to bytes later, by `inputs`)."""

    param: str  # "image", "image[1]", "mask"
    value: str | bytes  # URL, path, data URI, raw base64 — or uploaded bytes


@dataclass
class ImageJob:
    """A checked request. Not frozen: its inputs are let go of once the upstream body holds
    them (`let_go_of_inputs`)."""

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

    def let_go_of_inputs(self) -> None:
        """Drop the client's images and mask (megabytes each, as uploads or data URIs): once
        the upstream body is built, they must not live through the upstream wait too."""
        self.images.clear()
        self.mask = None


def _common(body: GenerationBody | EditBody, default_model: str, default_format: str):
    prompt = body.prompt.strip()
    if not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt",
                             code="invalid_prompt")
    if len(body.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"'prompt' is {len(body.prompt)} characters; the most is "
                             f"{MAX_PROMPT_CHARS}.", param="prompt", code="prompt_too_long")
    for name in UNSUPPORTED.keys() & (body.model_extra or {}).keys():
        if body.model_extra[name] not in (None, ""):  # null or blank is unset
            raise unsupported(name)
    for name, (accepted, _) in UNSUPPORTED_VALUES.items():
        value = getattr(body, name, None)
        if value not in (None, "", *accepted):
            raise unsupported_value(name, value)
    resolved = catalog.resolve(body.model or default_model)
    size = resolved.size(body.size if body.size and body.size != "auto" else
                         default_size(resolved.model))
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}; got {n}.", param="n",
                             code="invalid_n")
    return resolved, body.prompt, size, n, response_format(body, default_format)


def default_size(model: ImageModel) -> str:
    """The size for an omitted or `auto` size (OpenAI's `auto` lets the model choose): one
    rule for both, so the two never get different images or prices."""
    return catalog.DEFAULT_SIZE if catalog.DEFAULT_SIZE in model.prices else model.sizes[0]


def response_format(body: GenerationBody | EditBody, default: str) -> Literal["url", "b64_json"]:
    """The client's, else the configured default; `auto` answers as OpenAI would for the name
    the client sent: `b64_json` for its gpt-image names (code written for them reads it),
    `url` for every other name (dall-e's, ours, BlockRun's ids)."""
    if body.response_format:
        return body.response_format
    if default != "auto":
        return default  # type: ignore[return-value]
    return "b64_json" if body.model and catalog.openai_image_name(body.model) else "url"


def generation_job(body: GenerationBody, default_format: str = "auto") -> ImageJob:
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
             mask_upload: SourceImage | None = None, default_format: str = "auto") -> ImageJob:
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
