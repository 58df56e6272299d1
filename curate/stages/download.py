"""Download and resize images with img2dataset's own machinery.

Each batch becomes an in-memory Arrow shard that img2dataset's
``Downloader.download_shard`` processes exactly as it does on its own
(thread pool, retries, X-Robots-Tag opt-outs, ``Resizer``, sha256); a small
writer class collects its samples instead of writing tar/parquet files.  Under
the Ray runner the batches download in parallel across the cluster.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)

_IDX = "__curate_idx"


class DownloadParams(StageParams):
    stage: str = "download"
    image_size: int = Field(256, ge=1, description="target size (img2dataset semantics per resize_mode)")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    upscale_interpolation: Literal["nearest", "linear", "cubic", "area", "lanczos"] = "lanczos"
    downscale_interpolation: Literal["nearest", "linear", "cubic", "area", "lanczos"] = "area"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality, png compression 0-9")
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    timeout: float = Field(10.0, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0)
    thread_count: int = Field(32, ge=1, description="download threads per worker")
    user_agent_token: str | None = Field(None, description="token added to the User-Agent and matched in X-Robots-Tag")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out ([] to ignore them)",
    )
    min_image_size: int = Field(0, ge=0, description="reject images whose shorter side is smaller")
    max_image_area: float | None = Field(None, gt=0, description="reject images with more pixels")
    max_aspect_ratio: float | None = Field(None, ge=1, description="reject images more elongated")


_HTTP = re.compile(r"HTTP Error (\d{3})")


def classify(status: str | None, error: str | None) -> tuple[str, str | None]:
    """(reject_reason, error_type) for a failed sample."""
    e = (error or "").lower()
    if status == "failed_to_resize":
        if e == "image too small":
            return "image_too_small", None
        if e == "image area too large":
            return "image_too_large", None
        if e == "aspect ratio too large":
            return "aspect_ratio_too_large", None
        return "decode_failed", "decode_error"
    if "x-robots-tag" in e:
        return "opted_out", "x_robots_tag"
    m = _HTTP.search(error or "")
    if m:
        return "download_failed", f"http_{m.group(1)}"
    if "timed out" in e or "timeout" in e:
        return "download_failed", "timeout"
    if "refused" in e:
        return "download_failed", "connection_refused"
    if "name or service not known" in e or "nodename nor servname" in e or "getaddrinfo" in e:
        return "download_failed", "dns_error"
    if "ssl" in e or "certificate" in e:
        return "download_failed", "ssl_error"
    if "hash mismatch" in e:
        return "download_failed", "hash_mismatch"
    if "remote end closed" in e or "connection reset" in e or "incomplete" in e:
        return "download_failed", "connection_error"
    return "download_failed", "other"


@register
class Download(MapStage):
    name = "download"
    Params = DownloadParams
    needs = (S.URL,)
    produces = (S.IMAGE, S.WIDTH, S.HEIGHT, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT, S.IMAGE_SHA256,
                S.DOWNLOAD_STATUS, S.DOWNLOAD_ERROR)
    default_resources = Resources(num_cpus=1.0, batch_size=256, stateful=True)
    params: DownloadParams

    def setup(self) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        os.environ.setdefault("WANDB_MODE", "disabled")
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer

        p = self.params
        self._downloader_cls = Downloader
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
        self._lock = threading.Lock()

    def _download(self, urls: list[str | None]) -> dict[int, tuple[bytes | None, dict[str, Any]]]:
        import fsspec

        p = self.params
        results: dict[int, tuple[bytes | None, dict[str, Any]]] = {}

        class _Collect:  # img2dataset's sample-writer interface, keeping samples in memory
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def write(self, img_str: bytes | None, key: str, caption: Any, meta: dict[str, Any]) -> None:
                results[int(meta[_IDX])] = (img_str, meta)

            def close(self) -> None:
                pass

        shard = pa.table({"url": pa.array(urls, pa.string()), _IDX: pa.array(range(len(urls)), pa.int64())})
        fs = fsspec.filesystem("memory")
        path = f"/curate-download/{uuid.uuid4().hex}.arrow"
        with fs.open(path, "wb") as f, pa.ipc.new_file(f, shard.schema) as w:
            w.write_table(shard)
        try:
            downloader = self._downloader_cls(
                sample_writer_class=_Collect, resizer=self._resizer, thread_count=p.thread_count,
                save_caption=False, extract_exif=False, output_folder="memory://curate-unused",
                column_list=["url", _IDX], timeout=p.timeout, number_sample_per_shard=max(len(urls), 10),
                oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
                encode_format=p.encode_format, retries=p.retries, user_agent_token=p.user_agent_token,
                disallowed_header_directives=p.disallowed_header_directives or None,
            )
            downloader.download_shard((0, f"memory://{path}"))
        finally:
            if fs.exists(path):  # img2dataset removes its input shard itself when done
                fs.rm(path)
        return results

    def process(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        results = self._download(table[S.URL].to_pylist())
        cols: dict[str, list] = {c: [None] * n for c in self.produces}
        reasons: list[str | None] = [None] * n
        errtypes: list[str | None] = [None] * n
        for i in range(n):
            img, meta = results.get(i, (None, {"status": "failed_to_download",
                                                 "error_message": "no result from the downloader"}))
            status, error = meta.get("status"), meta.get("error_message")
            cols[S.DOWNLOAD_STATUS][i] = status
            cols[S.DOWNLOAD_ERROR][i] = error
            if status == "success" and img is not None:
                cols[S.IMAGE][i] = img
                cols[S.WIDTH][i] = meta.get("width")
                cols[S.HEIGHT][i] = meta.get("height")
                cols[S.ORIGINAL_WIDTH][i] = meta.get("original_width")
                cols[S.ORIGINAL_HEIGHT][i] = meta.get("original_height")
                cols[S.IMAGE_SHA256][i] = meta.get("sha256")
            else:
                reasons[i], errtypes[i] = classify(status, error)
        for c in self.produces:
            table = with_column(table, c, cols[c])
        mask = [r is not None for r in reasons]
        if any(mask):
            table = self.reject(table, mask, reasons, cols[S.DOWNLOAD_ERROR], errtypes)
        return table

    def describe(self) -> dict[str, Any]:
        p = self.params
        return {"image_size": p.image_size, "resize_mode": p.resize_mode, "encode_format": p.encode_format,
                "timeout": p.timeout, "thread_count": p.thread_count}


