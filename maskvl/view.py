"""Self-contained HTML pages for maskvl Parquet files.

`write_page` inlines the static viewer (``viewer/``: HTML, CSS, the vendored
Parquet reader and the viewer's scripts, in the order ``index.html`` lists
them), the Parquet file (base64) and the images (data URLs) into ONE HTML file
that opens from ``file://`` with no server and no network. `open_in_browser`
opens such a page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import pathlib
import re
import webbrowser

from .io import atomic_write_text

__all__ = ["ViewError", "write_page", "open_in_browser", "VIEWER_DIR"]

log = logging.getLogger(__name__)

#: The static viewer's folder (repository layout: maskvl/ and viewer/ are siblings).
# The repository's viewer/ (source checkouts, editable installs); a wheel carries a copy in
# maskvl/_viewer (setup.py's build_py puts it there).
_PKG = pathlib.Path(__file__).resolve().parent
VIEWER_DIR = _PKG.parent / "viewer" if (_PKG.parent / "viewer" / "index.html").is_file() else _PKG / "_viewer"

# Tags of viewer/index.html that write_page replaces by inline content: the
# stylesheet, and every classic script (the vendored reader first, then the
# viewer's parts), each inlined where its tag stands so their order is kept.
_CSS_TAG = '<link rel="stylesheet" href="viewer.css">'
_VENDOR_TAG = '<script src="vendor/hyparquet.js"></script>'
_SCRIPT_TAG_RE = re.compile(r'<script src="([A-Za-z0-9_./-]+\.js)"></script>')
_CSP_SCRIPT_SRC = "script-src 'self' 'unsafe-inline' 'wasm-unsafe-eval'"

# Image types a browser shows in <img>/canvas, by magic bytes. SVG is left out
# on purpose: it is a document that can carry script.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class ViewError(ValueError):
    """A file given to the viewer cannot be used; the message is one line for the user."""


def _read_bytes(path: pathlib.Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ViewError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ViewError(f"{what} is a directory, not a file: {path}") from None
    except OSError as e:
        raise ViewError(f"cannot read {what.lower()} {path}: {e.strerror or e}") from None


def _image_mime(data: bytes) -> str | None:
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _maskvl_metadata(data: bytes, path: pathlib.Path) -> dict | None:
    """The file's `maskvl` metadata (FORMAT.md) or None; ViewError if the footer is broken."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        md = pq.read_metadata(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types for a broken footer
        raise ViewError(f"not a readable Parquet file: {path} ({str(e).splitlines()[0]})") from None
    raw = (md.metadata or {}).get(b"maskvl")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ViewError(f"the maskvl metadata of {path} is not valid JSON") from None
    return meta if isinstance(meta, dict) else None


def _metadata_images(meta: dict | None, base: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """Readable image files named by the metadata, as (image index, path)."""
    found: list[tuple[int, pathlib.Path]] = []
    if not meta or not isinstance(meta.get("images"), list):
        return found
    for i, im in enumerate(meta["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("path"), str) or not im["path"]:
            continue
        p = pathlib.Path(im["path"])
        if not p.is_absolute():
            p = base / p  # relative paths are taken relative to the Parquet file
        index = im.get("index", i)
        if p.is_file() and os.access(p, os.R_OK):
            found.append((index if isinstance(index, int) else i, p))
        else:
            log.info("image %s named by the metadata is not readable; not embedded", p)
    return found


def _script_tag(body: str) -> str:
    # An inline script must not contain "</script" (it would end the element early)
    # nor "<!--" (which changes how the HTML parser scans script text).
    low = body.lower()
    if "</script" in low or "<!--" in low:
        raise RuntimeError("viewer script contains '</script' or '<!--' and cannot be inlined")
    return f"<script>{body}</script>"


def _viewer_scripts(page: str) -> list[tuple[str, str]]:
    """The classic scripts that viewer/index.html loads, in order, as (tag, source text)."""
    scripts = []
    for m in _SCRIPT_TAG_RE.finditer(page):
        rel = m.group(1)
        path = (VIEWER_DIR / rel).resolve()
        if ".." in rel.split("/") or not path.is_file():
            raise RuntimeError(f"viewer/index.html names a script that is not in the viewer folder: {rel}")
        scripts.append((m.group(0), path.read_text(encoding="utf-8")))
    if not scripts or scripts[0][0] != _VENDOR_TAG:
        raise RuntimeError(f"viewer/index.html must load {_VENDOR_TAG} first")
    return scripts


def _csp_hash(body: str) -> str:
    digest = hashlib.sha256(body.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def write_page(
    parquet_path: str | os.PathLike[str],
    out_html: str | os.PathLike[str] | None = None,
    images: list[str] | None = None,
) -> pathlib.Path:
    """Write one self-contained HTML page showing a maskvl Parquet file.

    The page holds the viewer (HTML, CSS, scripts), the Parquet bytes (base64)
    and the images (data URLs); it needs no server and no network.

    Args:
        parquet_path: the Parquet file (maskvl format, or the prototype's format).
        out_html: where to write the page; default: next to the Parquet file,
            with the suffix ``.html``.
        images: image files for the overlay, in image order (the first is image
            0, ...). When None, the images named in the file's ``maskvl``
            metadata are embedded if they are readable; missing ones are skipped.

    Returns:
        The absolute path of the written page.

    Raises:
        ViewError: (a ValueError) the Parquet file or an explicitly given image is
            missing, unreadable or of the wrong type, or the output folder does
            not exist.
    """
    src = pathlib.Path(parquet_path)
    data = _read_bytes(src, "Parquet file")
    if len(data) < 12 or data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        raise ViewError(f"not a Parquet file (missing PAR1 magic bytes): {src}")
    meta = _maskvl_metadata(data, src)

    if images is None:
        chosen = _metadata_images(meta, src.resolve().parent)
    else:
        chosen = [(i, pathlib.Path(p)) for i, p in enumerate(images)]
    embedded = []
    for index, path in chosen:
        blob = _read_bytes(path, "Image file")
        mime = _image_mime(blob)
        if mime is None:
            raise ViewError(f"not a PNG, JPEG, GIF, WebP or BMP image: {path}")
        embedded.append({
            "index": index,
            "name": path.name,
            "data_url": f"data:{mime};base64," + base64.b64encode(blob).decode("ascii"),
        })

    out = pathlib.Path(out_html) if out_html is not None else src.with_suffix(".html")
    if out.is_dir():
        raise ViewError(f"output path is a directory: {out}")
    if not out.parent.is_dir():
        raise ViewError(f"output folder does not exist: {out.parent}")

    if not (VIEWER_DIR / "index.html").is_file():
        raise ViewError(f"viewer files not found in {VIEWER_DIR}")
    page = (VIEWER_DIR / "index.html").read_text(encoding="utf-8")
    css = (VIEWER_DIR / "viewer.css").read_text(encoding="utf-8")
    if "</style" in css.lower():
        raise RuntimeError("viewer.css contains '</style' and cannot be inlined")
    scripts = _viewer_scripts(page)

    # Data blocks: non-executable script types, so the browser never runs them.
    # base64 holds no '<'; the JSON escapes '<', '>' and '&' so no text in it can
    # close the element. The file name goes through html.escape for the attribute.
    images_json = (json.dumps(embedded).replace("<", "\\u003c").replace(">", "\\u003e")
                   .replace("&", "\\u0026"))
    data_blocks = (
        f'<script type="application/octet-stream" id="maskvl-data" '
        f'data-name="{html.escape(src.name, quote=True)}">'
        + base64.b64encode(data).decode("ascii")
        + "</script>\n"
        + f'<script type="application/json" id="maskvl-images">{images_json}</script>\n'
    )
    # Only the inline scripts may run: allow them by hash rather than by
    # 'unsafe-inline', so even an injected inline handler could not run.
    # 'wasm-unsafe-eval' lets the bundled zstd decoder compile its WebAssembly.
    csp_scripts = "script-src " + " ".join(_csp_hash(body) for _, body in scripts) + " 'wasm-unsafe-eval'"
    replacements = [(_CSS_TAG, f"<style>{css}</style>"), (_CSP_SCRIPT_SRC, csp_scripts)]
    for tag, body in scripts:
        # The data blocks go before the reader, so they exist when the viewer starts.
        replacements.append((tag, (data_blocks if tag == _VENDOR_TAG else "") + _script_tag(body)))
    for old, _ in replacements:
        if page.count(old) != 1:
            raise RuntimeError(f"viewer/index.html no longer contains {old!r} exactly once")
    # One pass over the template, so inserted content is never searched again.
    table = dict(replacements)
    page = re.sub("|".join(re.escape(old) for old, _ in replacements), lambda m: table[m.group(0)], page)
    title = f"<title>{html.escape(src.name)} · maskvl viewer</title>"
    page = page.replace("<title>maskvl viewer</title>", title, 1)

    atomic_write_text(out, page)
    return out.resolve()


def open_in_browser(path: str | os.PathLike[str]) -> bool:
    """Open a page (e.g. one written by `write_page`) in the default web browser.

    Returns what `webbrowser.open` returns: True if a browser was launched.
    """
    return webbrowser.open(pathlib.Path(path).resolve().as_uri())
