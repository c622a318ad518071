"""Parse a multipart form (OpenAI `images.edit`) with text fields that must be real text.

Starlette's parser decodes a text field with the charset the client names and, when the bytes
do not decode, quietly falls back to latin-1: `caf\\xe9` becomes "café" and is paid for as that
prompt. Here a field that is not text in its charset (or decodes to lone surrogates, as
`charset=unicode_escape` can) is a 400 naming it; a field over the size limit is one too.
A part of an image field that is not text is a file sent without a filename, and is taken
as one.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from clawrouter.errors import InvalidRequest


class _NotText(MultiPartException):
    def __init__(self, field: str) -> None:
        super().__init__(f"Field '{field}' is not text.")
        self.field = field


class _StrictTextParser(MultiPartParser):
    #: fields whose parts without a filename may still carry a file's bytes
    file_fields: frozenset[str] = frozenset()
    #: the closing boundary came: without it the last part may be cut short (RFC 7578)
    ended = False

    def on_end(self) -> None:
        self.ended = True
        super().on_end()

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            data = bytes(part.data)
            try:
                data.decode(self._charset).encode()
            except UnicodeError:  # not in its charset, or not encodable as UTF-8
                if part.field_name not in self.file_fields:
                    raise _NotText(part.field_name) from None
                # A file sent without a filename (the SDK's `(None, bytes)`, curl's
                # `-F 'image=<a.png'`): its bytes, as an upload, for the sniff to judge.
                self.items.append((part.field_name, UploadFile(io.BytesIO(data), size=len(data))))
                return
        super().on_part_end()


async def read_multipart(request: Request, stream: AsyncIterator[bytes], *, max_files: int,
                         max_fields: int, max_text_bytes: int,
                         file_fields: frozenset[str]) -> FormData:
    """The form read from `stream` (the request's body), its files spooled to temporary
    files; the caller closes it."""
    parser = _StrictTextParser(request.headers, stream, max_files=max_files,
                               max_fields=max_fields, max_part_size=max_text_bytes)
    parser.file_fields = file_fields
    try:
        form = await parser.parse()
    except _NotText as exc:
        raise InvalidRequest(f"'{exc.field}' is not valid text (send UTF-8).",
                             param=exc.field, code="invalid_type") from None
    except MultiPartException as exc:
        if "exceeded maximum size" in exc.message:
            raise InvalidRequest(
                f"A form field is over {max_text_bytes} bytes, the most an image given as "
                "text may take (CLAWROUTER_MAX_IMAGE_MB).", code="image_too_large") from None
        raise InvalidRequest(f"Malformed multipart form: {exc.message}",
                             code="invalid_multipart") from None
    if not parser.ended:  # a part may be missing or cut short: which request would be paid?
        await form.close()
        raise InvalidRequest("Malformed multipart form: it ends without its closing boundary "
                             "(--boundary--), so its last part may be cut short.",
                             code="invalid_multipart")
    return form
