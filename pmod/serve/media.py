"""Images of a request: `data:` URLs, local paths under the one folder the operator allows, remote URLs only
when enabled. Each is read with a byte cap and decoded by `load_image` (size checked from the header first)."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pmod.serve.protocol import RequestError

__all__ = ["MediaPolicy", "load_request_images"]


@dataclass(frozen=True)
class MediaPolicy:
    allowed_folder: Path | None = None  # local paths (or file:// URLs) must resolve inside it; None: no local files
    allow_remote: bool = False  # http(s) URLs fetched by the server
    max_image_bytes: int = 16 * 2**20
    remote_timeout_s: float = 10.0


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def _data_url(url: str, what: str, cap: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(400, f"{what}: a data URL must look like data:image/png;base64,<data>", "messages")
    if len(payload) * 3 // 4 > cap:
        raise RequestError(413, f"{what}: the image is over {_size(cap)}", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{what}: the data URL's base64 payload is malformed", "messages") from None


def _local(url: str, what: str, policy: MediaPolicy) -> Path:
    if policy.allowed_folder is None:
        raise RequestError(400, f"{what}: local image paths are disabled (start the server with --allowed-local-media-path DIR)"
                           ", send the image as a data: URL", "messages")
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    root = policy.allowed_folder.resolve()
    p = (root / path).resolve()  # an absolute path replaces root; either way it must end up inside root
    if not p.is_relative_to(root):
        raise RequestError(400, f"{what}: {path!r} lies outside the allowed media folder", "messages")
    if not p.is_file():
        raise RequestError(400, f"{what}: no image file {path!r} in the allowed media folder", "messages")
    if p.stat().st_size > policy.max_image_bytes:
        raise RequestError(413, f"{what}: the image is over {_size(policy.max_image_bytes)}", "messages")
    return p


def _remote(url: str, what: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise RequestError(400, f"{what}: remote image URLs are disabled (start the server with --allow-remote-images)"
                           ", send the image as a data: URL", "messages")
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.remote_timeout_s, follow_redirects=True) as r:
            r.raise_for_status()
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > policy.max_image_bytes:
                    raise RequestError(413, f"{what}: the image is over {_size(policy.max_image_bytes)}", "messages")
            return bytes(data)
    except httpx.HTTPError as e:
        raise RequestError(400, f"{what}: could not fetch {url!r} ({type(e).__name__}: {e})", "messages") from None


def load_request_images(urls: list[str], policy: MediaPolicy, processor) -> list:
    """The request's images as decoded PIL images, with the processor's size limits; RequestError naming the image."""
    from pmod.multimodal.images import load_image

    out = []
    for i, url in enumerate(urls):
        what = f"image {i}"
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            src = _data_url(url, what, policy.max_image_bytes)
        elif scheme in ("http", "https"):
            src = _remote(url, what, policy)
        elif scheme in ("", "file"):
            src = _local(url, what, policy)
        else:
            raise RequestError(400, f"{what}: unsupported URL scheme {scheme!r}; use a data: URL", "messages")
        try:
            out.append(load_image(src, max_pixels=processor.max_pixels, max_side=processor.max_side,
                                  max_aspect_ratio=processor.max_aspect_ratio, exif_transpose=processor.exif_transpose,
                                  name=what))
        except (ValueError, OSError) as e:
            raise RequestError(400, f"{what}: not a usable image ({e})", "messages") from None
    return out
