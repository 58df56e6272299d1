"""Download and resize images from hostile web servers.

The fetch is curate's guarded client (:mod:`curate.net.http`, on urllib3): a deadline per
request, ``max_bytes``, every address checked (no SSRF to loopback, private, link-local or
metadata addresses unless ``allow_networks`` opens them), bounded redirects, at most
``max_per_host`` requests to one host, ``Retry-After`` and optional robots.txt.  img2dataset's
own fetch cannot bound a request's time or bytes, so only its X-Robots-Tag rule
(``is_disallowed``) and its ``Resizer`` are used, the latter as img2dataset's downloader uses
it: download threads fetch, with at most ``2 x thread_count`` fetched images waiting
(img2dataset's bound); where img2dataset decodes and resizes one image at a time in the
worker's main thread, ``resize_threads`` (default: the CPUs the worker may use) do it here, so
an in-process run uses every core while each decoded image stays bounded.  Image dimensions are read from the header (Pillow, no decode) and images above
``max_image_pixels`` are rejected before any decoding.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import logging
import os
import warnings
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams, threshold, worker_cpus
from curate.table_ops import with_column

log = logging.getLogger(__name__)

PILLOW_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb bound (Image.MAX_IMAGE_PIXELS)
UA_BASE = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's


class DownloadParams(StageParams):
    execution_params: ClassVar[tuple[str, ...]] = (*StageParams.execution_params, "thread_count", "resize_threads")
    stage: Literal["download"] = "download"
    image_size: int = Field(256, ge=1, description="target size (img2dataset semantics per resize_mode)")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    upscale_interpolation: Literal["nearest", "linear", "cubic", "area", "lanczos"] = "lanczos"
    downscale_interpolation: Literal["nearest", "linear", "cubic", "area", "lanczos"] = "area"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality, png compression 0-9")
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    timeout: float = Field(10.0, gt=0, description="seconds: connect timeout and per-read timeout")
    deadline: float = Field(30.0, gt=0, description="seconds for a whole request: connect, redirects, "
                                                    "Retry-After waits and body")
    max_bytes: int = Field(32 << 20, ge=1, description="largest response body (Content-Length and streamed)")
    max_image_pixels: int = Field(PILLOW_MAX_PIXELS, ge=1, description="width x height read from the header; "
                                  "larger images are rejected without decoding")
    max_redirects: int = Field(5, ge=0)
    max_per_host: int = Field(16, ge=1, description="concurrent requests to one host (per worker)")
    allow_networks: list[str] = Field(default_factory=list, description="CIDRs fetched although not global "
                                      "unicast (e.g. 127.0.0.0/8 for a local server); everything else "
                                      "non-global is refused as blocked_address")
    static_hosts: dict[str, list[str]] = Field(default_factory=dict, description="host name -> addresses, "
                                               "used instead of DNS (like curl --resolve); still guarded")
    respect_robots_txt: bool = Field(False, description="fetch and obey each host's robots.txt (cached)")
    request_headers: dict[str, str] = Field(default_factory=dict, description="request headers added to or "
                                            "replacing curate's (e.g. Referer, Connection: keep-alive); not Host")
    ca_bundle: str | None = Field(None, description="PEM file of the CAs trusted for https:// (replaces the default: "
                                  "SSL_CERT_FILE / SSL_CERT_DIR when set, else certifi's bundle)")
    retries: int = Field(0, ge=0, description="extra attempts after a transient error (within the deadline)")
    thread_count: int = Field(32, ge=1, description="download threads per worker")
    resize_threads: int | None = Field(None, ge=1, description="images decoded and resized at once per worker "
                                       "(OpenCV releases the GIL); default: the CPUs the worker may use "
                                       "(its num_cpus in a Ray actor, the process's CPUs in-process)")
    user_agent_token: str | None = Field(None, description="token added to the User-Agent and matched in X-Robots-Tag")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out ([] to ignore them)",
    )
    min_image_size: int = Field(0, ge=0, description="reject images whose shorter side is smaller")
    max_image_area: float | None = Field(None, gt=0, description="reject images with more pixels (after decoding; "
                                         "see max_image_pixels for the check before it)")
    max_aspect_ratio: float | None = Field(None, ge=1, description="reject images more elongated")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        from curate.net.guard import parse_networks

        parse_networks(v)
        return v

    @field_validator("request_headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if k.lower() == "host":
                raise ValueError("Host is set from each URL")
            if not k.strip() or not k.isascii() or any(c in k + val for c in "\r\n\0"):
                raise ValueError(f"{k!r}: a header needs an ASCII name and no line breaks or NUL")
        return v

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, v: str | None) -> str | None:
        if v is None:
            return None
        path = os.path.expanduser(v)
        if not os.path.isfile(path):
            raise ValueError(f"{v!r} is not a file (a PEM bundle of CA certificates)")
        return path

    @field_validator("static_hosts")
    @classmethod
    def _static(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        import ipaddress

        for host, addrs in v.items():
            for a in addrs:
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise ValueError(f"static_hosts.{host}: {a!r} is not an IP address") from None
        return v


RESIZE_ERRORS = {"image too small": "image_too_small", "image area too large": "image_too_large",
                 "aspect ratio too large": "aspect_ratio_too_large"}


class _Headers:
    """img2dataset's ``is_disallowed`` reads headers through ``get_all`` (http.client's interface)."""

    def __init__(self, headers: Any) -> None:
        self.h = headers

    def get_all(self, name: str, default: Any = None) -> Any:
        return self.h.getlist(name) or default


class _Unsuppressed:
    """Stands in for img2dataset's ``SuppressStdoutStderr`` in curate's copy of its resizer module.

    That context manager points the process's file descriptors 1 and 2 at /dev/null around every
    image (``os.dup2``) and back afterwards.  File descriptors are shared by all threads, so with
    several resize threads the saves and restores interleave and stdout/stderr can stay on /dev/null
    for the rest of the process (the run's summary and every later log line lost), and any thread
    logging during a resize is silenced too.  curate's resizing therefore leaves them alone: a
    warning a C decoder prints about a corrupt image reaches stderr."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _img2dataset_parts() -> tuple[Any, Any]:
    """img2dataset's ``Resizer`` and ``is_disallowed`` without running its package ``__init__``.

    ``import img2dataset.resizer`` first imports the package, whose ``__init__`` loads the whole CLI
    (its webdataset writer imports torch): ~4.5 s and ~800 MB in every download worker, against
    ~1.0 s for the two modules used here (albumentations; the downloader's stats logger, which would
    import wandb, is replaced by a stand-in).  The resizer is loaded from its file as a private module
    (``_curate_img2dataset_resizer``, see :class:`_Unsuppressed`); the downloader is loaded under a
    bare parent package, then everything is taken out of ``sys.modules`` again, so a later
    ``import img2dataset`` in the same process gets the real package and its real logger.
    """
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("img2dataset is not installed")
    name = "_curate_img2dataset_resizer"
    resizer = sys.modules.get(name)
    if resizer is None:
        path = os.path.join(list(spec.submodule_search_locations)[0], "resizer.py")
        rspec = importlib.util.spec_from_file_location(name, path)
        if rspec is None or rspec.loader is None:
            raise ImportError(f"img2dataset's resizer is not at {path}")
        resizer = importlib.util.module_from_spec(rspec)
        rspec.loader.exec_module(resizer)
        resizer.SuppressStdoutStderr = _Unsuppressed  # type: ignore[attr-defined]
        sys.modules[name] = resizer
    if "img2dataset" in sys.modules:  # the real package is already loaded: nothing to save
        return resizer.Resizer, importlib.import_module("img2dataset.downloader").is_disallowed
    before = set(sys.modules)
    bare = types.ModuleType("img2dataset")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    sys.modules["img2dataset"] = bare
    # the downloader module imports its stats logger only for names is_disallowed never uses; that logger
    # imports wandb (~0.5 s per worker): a stand-in holding those names is loaded in its place
    logger = types.ModuleType("img2dataset.logger")
    logger.CappedCounter = logger.write_stats = None  # type: ignore[attr-defined]
    sys.modules["img2dataset.logger"] = logger
    try:
        disallowed = importlib.import_module("img2dataset.downloader").is_disallowed
    finally:
        for mod in set(sys.modules) - before:
            if mod == "img2dataset" or mod.startswith("img2dataset."):
                del sys.modules[mod]
    return resizer.Resizer, disallowed


@register
class Download(MapStage):
    name = "download"
    Params = DownloadParams
    needs = (S.URL,)
    produces = (S.IMAGE, S.WIDTH, S.HEIGHT, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT, S.IMAGE_SHA256,
                S.DOWNLOAD_STATUS, S.DOWNLOAD_ERROR)
    #: what ``curate run --retry-failed`` fetches again by default: errors a server or network may not repeat
    #: (a timeout, a dropped or refused connection, a failed DNS lookup or TLS handshake, 429, any 5xx)
    transient_errors = ("timeout", "connection_error", "connection_refused", "dns_error", "ssl_error", "http_429",
                        "http_5*")
    # not an actor pool: setting up is cheap (a connection pool, the resizer), and a worker keeps it for the
    # segment anyway; so a download segment runs on Ray as one task per shard (see curate.runners.ray_runner)
    default_resources = Resources(num_cpus=1.0, batch_size=256)
    params: DownloadParams

    def setup(self) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        os.environ.setdefault("WANDB_MODE", "disabled")
        from PIL import Image

        from curate.net.guard import AddressGuard
        from curate.net.http import Fetcher
        from curate.net.robots import RobotsCache

        Resizer, is_disallowed = _img2dataset_parts()
        p = self.params
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
        self._resizer = Resizer(
            image_size=p.image_size,
            resize_mode=p.resize_mode,
            resize_only_if_bigger=p.resize_only_if_bigger,
            upscale_interpolation=p.upscale_interpolation,
            downscale_interpolation=p.downscale_interpolation,
            encode_quality=p.encode_quality,
            encode_format=p.encode_format,
            skip_reencode=p.skip_reencode,
            disable_all_reencoding=p.disable_all_reencoding,
            min_image_size=p.min_image_size,
            max_image_area=p.max_image_area if p.max_image_area is not None else float("inf"),
            max_aspect_ratio=p.max_aspect_ratio if p.max_aspect_ratio is not None else float("inf"),
        )
        agent = p.user_agent_token or "curate"
        directives = p.disallowed_header_directives

        def veto(headers: Any) -> tuple[str, str, str] | None:
            if directives and is_disallowed(_Headers(headers), p.user_agent_token, directives):
                return "opted_out", "x_robots_tag", "Use of image disallowed by X-Robots-Tag directive"
            return None

        self.fetcher = Fetcher(
            AddressGuard(p.allow_networks, static_hosts=p.static_hosts, resolve_timeout=min(p.timeout, p.deadline)),
            timeout=p.timeout, deadline=p.deadline, max_bytes=p.max_bytes, max_redirects=p.max_redirects,
            max_per_host=p.max_per_host, retries=p.retries, user_agent=f"{UA_BASE} (compatible; {agent})",
            robots=RobotsCache(agent) if p.respect_robots_txt else None, veto=veto, ca_bundle=p.ca_bundle,
            headers=p.request_headers)
        self.fetcher.tls_context()  # a CA bundle that cannot be loaded stops the run here, in one line

    def teardown(self) -> None:
        fetcher = getattr(self, "fetcher", None)
        if fetcher is not None:
            fetcher.close()

    def _image(self, body: bytes) -> tuple[dict[str, Any] | None, tuple[str, str | None, str] | None]:
        """Header check, then img2dataset's Resizer: (columns, None) or (None, (reason, error_type, detail))."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(body)) as im:  # parses the header only
                w, h = im.size
        except Image.DecompressionBombError as e:
            return None, ("image_too_large", None, str(e)[:300])
        except Image.UnidentifiedImageError:
            return None, ("decode_failed", "decode_error", "not an image Pillow can identify from its header")
        except Exception as e:  # noqa: BLE001 - any unreadable header (the message may hold object reprs)
            return None, ("decode_failed", "decode_error", f"unreadable image header ({type(e).__name__})")
        if w * h > self.params.max_image_pixels:
            return None, ("image_too_large", None, f"{w}x{h} = {w * h:,} pixels > max_image_pixels "
                                                   f"{self.params.max_image_pixels:,} (not decoded)")
        img, width, height, ow, oh, err = self._resizer(io.BytesIO(body))
        if err is not None or img is None:
            reason = RESIZE_ERRORS.get(err or "")
            return None, (reason, None, err) if reason else ("decode_failed", "decode_error", err or "no image")
        return {S.IMAGE: img, S.WIDTH: width, S.HEIGHT: height, S.ORIGINAL_WIDTH: ow, S.ORIGINAL_HEIGHT: oh,
                S.IMAGE_SHA256: hashlib.sha256(body).hexdigest()}, None

    def _fetch(self, url: str | None) -> Any:
        return self.fetcher.get(url or "")

    def process(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        urls = table[S.URL].to_pylist()
        cols: dict[str, list] = {c: [None] * n for c in self.produces}
        reasons: list[str | None] = [None] * n
        errtypes: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        window = 2 * self.params.thread_count  # fetched images waiting for a resizer, as img2dataset bounds them
        resizers = self.params.resize_threads or worker_cpus()
        with cf.ThreadPoolExecutor(max_workers=max(1, min(self.params.thread_count, n)),
                                   thread_name_prefix="curate-download") as pool, \
                cf.ThreadPoolExecutor(max_workers=resizers, thread_name_prefix="curate-resize") as resize:
            todo = iter(range(n))
            fetching: dict[cf.Future, int] = {}
            resizing: dict[cf.Future, int] = {}
            for i in (next(todo, None) for _ in range(window)):
                if i is not None:
                    fetching[pool.submit(self._fetch, urls[i])] = i
            while fetching or resizing:  # a row holds its place in the window until it is resized
                done, _ = cf.wait([*fetching, *resizing], return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    if fut in fetching:
                        i, resp = fetching.pop(fut), fut.result()
                        if resp.ok:
                            body, resp.body = resp.body, None
                            resizing[resize.submit(self._image, body)] = i
                            continue
                        self._failed(i, resp, cols, reasons, errtypes, details)
                    else:
                        i = resizing.pop(fut)
                        self._resized(i, fut.result(), cols, reasons, errtypes, details)
                    j = next(todo, None)
                    if j is not None:
                        fetching[pool.submit(self._fetch, urls[j])] = j
        for c in self.produces:
            table = with_column(table, c, cols[c])
        mask = [r is not None for r in reasons]
        if any(mask):
            table = self.reject(table, mask, reasons, details, errtypes)
        return table

    @staticmethod
    def _failed(i: int, resp: Any, cols: dict[str, list], reasons: list, errtypes: list, details: list) -> None:
        cols[S.DOWNLOAD_STATUS][i] = "failed_to_download"
        reasons[i], errtypes[i], details[i] = resp.reason, resp.error_type, resp.detail
        cols[S.DOWNLOAD_ERROR][i] = resp.detail

    @staticmethod
    def _resized(i: int, result: tuple[dict[str, Any] | None, tuple[str, str | None, str] | None],
                 cols: dict[str, list], reasons: list, errtypes: list, details: list) -> None:
        got, why = result
        if why is not None:
            cols[S.DOWNLOAD_STATUS][i] = "failed_to_resize"
            reasons[i], errtypes[i], details[i] = why
            cols[S.DOWNLOAD_ERROR][i] = why[2]
            return
        cols[S.DOWNLOAD_STATUS][i] = "success"
        for k, v in got.items():
            cols[k][i] = v

    def thresholds(self) -> list[dict[str, Any]]:
        m = self.params.min_image_size
        return [threshold("image_size", m, "min", "min_image_size")] if m else []

    def describe(self) -> dict[str, Any]:
        p = self.params
        return {"image_size": p.image_size, "resize_mode": p.resize_mode, "encode_format": p.encode_format,
                "timeout": p.timeout, "deadline": p.deadline, "max_bytes": p.max_bytes,
                "max_image_pixels": p.max_image_pixels, "allow_networks": p.allow_networks,
                "max_per_host": p.max_per_host, "respect_robots_txt": p.respect_robots_txt,
                "ca_bundle": p.ca_bundle, "thread_count": p.thread_count,
                "resize_threads": p.resize_threads or worker_cpus()}
