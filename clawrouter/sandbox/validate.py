"""Check an image request body the way BlockRun does, before any 402 is issued.

BlockRun's quirks are kept on purpose: an absent or empty `model` means the default model, and
`quality` is refused for every model that does not take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from clawrouter.catalog import BY_ID, DEFAULT_GENERATE_MODEL, DEFAULT_SIZE, ImageModel
from clawrouter.sandbox.datauri import DataUri, DataUris

Route = Literal["generations", "image2image"]
MAX_N = 10
DELISTED = {"openai/dall-e-3": "Delisted 2026-05-25: OpenAI removed dall-e-3 from the API"}


class BadRequest(Exception):
    """A 400 in BlockRun's OpenAI-nested shape."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImageRequest:
    route: Route
    model: ImageModel
    prompt: str
    size: str
    n: int
    images: int = 0  # source images (image2image)
    mask: bool = False


def validate(body: Any, route: Route, uris: DataUris) -> ImageRequest:
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", None, "invalid_json")
    model = _model(body.get("model"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' is required and must be a non-empty string.", "prompt",
                         "invalid_prompt")
    size = body.get("size", DEFAULT_SIZE)
    if not isinstance(size, str) or size not in model.prices:
        raise BadRequest(f"Size {size!r} is not supported by {model.id}. "
                         f"Supported sizes: {', '.join(model.sizes)}.", "size", "invalid_size")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' must be an integer from 1 to {MAX_N}.", "n", "invalid_n")
    if "quality" in body and not model.quality:
        raise BadRequest(f"'quality' is not supported by {model.id}.", "quality",
                         "unsupported_parameter")
    if route == "generations":
        return ImageRequest(route, model, prompt, size, n)
    images, mask = _edit_inputs(body, model, uris)
    return ImageRequest(route, model, prompt, size, n, images, mask)


def _model(value: Any) -> ImageModel:
    if value is None or value == "":
        return BY_ID[DEFAULT_GENERATE_MODEL]  # BlockRun bills an empty model as the default
    if not isinstance(value, str):
        raise BadRequest("'model' must be a string.", "model", "invalid_model")
    if value in DELISTED:
        raise BadRequest(DELISTED[value], "model", "model_delisted")
    model = BY_ID.get(value)
    if model is None:
        raise BadRequest(f"Model {value!r} not found. Use a full model id such as "
                         f"{DEFAULT_GENERATE_MODEL!r}.", "model", "model_not_found")
    return model


def _edit_inputs(body: dict[str, Any], model: ImageModel, uris: DataUris) -> tuple[int, bool]:
    image = body.get("image")
    if image is None:
        raise BadRequest("'image' is required for image2image.", "image", "missing_image")
    images = image if isinstance(image, list) else [image]
    if not images:
        raise BadRequest("'image' must not be an empty list.", "image", "invalid_image")
    if not model.edits:
        raise BadRequest(f"{model.id} does not support image editing.", "model",
                         "edits_not_supported")
    if len(images) > model.max_images:
        raise BadRequest(f"{model.id} accepts at most {model.max_images} images, "
                         f"got {len(images)}.", "image", "too_many_images")
    for item in images:
        _image(item, uris, "image")
    mask = body.get("mask")
    if mask is None:
        return len(images), False
    if not model.mask:
        raise BadRequest(f"{model.id} does not support masks.", "mask", "mask_not_supported")
    if len(images) > 1:
        raise BadRequest("A mask can only be used with a single image.", "mask",
                         "mask_with_multiple_images")
    parsed = _image(mask, uris, "mask")
    if parsed.mime != "image/png" or parsed.sniffed != "image/png":
        raise BadRequest("'mask' must be a PNG data URI.", "mask", "invalid_mask")
    return 1, True


def _image(value: Any, uris: DataUris, param: str) -> DataUri:
    """Check one data URI: declared image/*, and bytes that sniff as an image."""
    parsed = uris.get(value) if isinstance(value, str) else None
    if parsed is None or not parsed.mime.startswith("image/"):
        raise BadRequest(f"'{param}' must be a data URI (data:image/<type>;base64,...); "
                         "plain URLs are not accepted.", param, f"invalid_{param}")
    if parsed.sniffed is None:
        raise BadRequest(f"'{param}' is not valid base64 image data.", param, f"invalid_{param}")
    return parsed
