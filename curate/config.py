"""The typed configuration of a run (pydantic), validated before any work starts."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from curate import registry
from curate.io.files import ROW_GROUP_BYTES, ROW_GROUP_ROWS
from curate.stage import StageParams


class ConfigError(ValueError):
    """A user mistake in the config: the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Strict):
    path: str = Field(description="file, directory or glob of parquet/csv/jsonl (optionally .gz)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "webdataset", "img2dataset"] = Field(
        "auto", description="auto: from the file names (parquet, csv, tsv, jsonl); webdataset: tars of "
        "image + txt + json samples; img2dataset: a folder img2dataset wrote (parquet or webdataset)")
    url_col: str = "url"
    caption_col: str = "caption"
    uid_col: str | None = Field(None, description="column holding a unique id; else uid = hash(url, caption)")
    shard_size: int = Field(10_000, ge=1, description="rows per work shard (and output file)")
    max_caption_chars: int = Field(10_000, ge=1, description="longer captions are rejected (caption_too_long)")
    max_url_chars: int = Field(8_192, ge=1, description="longer urls are rejected (url_too_long)")
    max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                description="longest JSONL/CSV line (and CSV field); longer ones are malformed_row")
    image_col: str | None = Field(None, description="Parquet column of encoded image bytes: the rows already "
                                  "have their images, the pipeline starts after the download stage")
    max_image_bytes: int = Field(32 << 20, ge=1, description="larger input images are rejected (image_too_large)")
    max_image_pixels: int = Field(89_478_485, ge=1, description="input images whose header claims more pixels "
                                  "are rejected (image_too_large), before any decoding")

    @property
    def provides_images(self) -> bool:
        """The input rows carry their images (no download stage runs)."""
        return self.image_col is not None or self.format in ("webdataset", "img2dataset")


class OutputConfig(_Strict):
    path: str
    overwrite: bool = Field(False, description="delete an existing output made with another config")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    row_group_rows: int = Field(ROW_GROUP_ROWS, ge=1, description="most rows in one Parquet row group of data/ "
                                "and rejected/ (a reader of one row -- a thumbnail, a loader's first sample -- "
                                "reads its whole row group)")
    row_group_bytes: int = Field(ROW_GROUP_BYTES, ge=1, description="about the most bytes of rows (their size in "
                                 "memory: image bytes, embeddings, text...) in one row group of data/ and "
                                 "rejected/; whichever of row_group_rows and this is hit first ends a group, so "
                                 "large images make more, smaller groups; a larger single row is a group alone")
    work_path: str | None = Field(None, description="folder for the intermediate work (ingest bases, shards "
                                  "between segments, fit views, done markers, global states): a local folder or "
                                  "a URI (s3://bucket/prefix, any fsspec filesystem); default OUTPUT/_work, on "
                                  "object storage too, so that every node of a cluster sharing only a bucket "
                                  "sees the same work. A resume needs the same folder")
    keep_work: bool = Field(True, description="keep the intermediate shards under _work/ after the run, so "
                            "that a re-run with changed later stages reuses the segments before them "
                            "(false: delete them; a re-run then redoes everything)")


class StorageConfig(_Strict):
    """How to reach object storage for ``s3://`` / ``gs://`` paths (credentials: the usual environment)."""

    endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, Ceph, a local test server...)")
    region: str | None = Field(None, description="S3 region")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra fsspec storage options")


class RunnerConfig(_Strict):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="existing Ray cluster ('auto' or ray://...); none: start one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray instance")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started Ray instance")
    object_store_memory: int | None = Field(None, ge=75 * 1024**2, description="bytes, local Ray only")
    actor_pools: Literal["auto", "always"] = Field(
        "auto", description="Ray: where model stages run in Ray Data actor pools, streamed. auto: a segment with "
        "a stage that holds a GPU; on CPUs a model segment runs one task per shard like the others, each worker "
        "process loading the segment's models once. always: every segment with a model stage")

    @model_validator(mode="after")
    def _address_means_ray(self) -> "RunnerConfig":
        # `--set runner.address=auto` on a local config: an address only makes sense with the Ray runner
        if self.address and self.kind == "local":
            self.kind = "ray"
        return self


class Config(_Strict):
    input: InputConfig
    output: OutputConfig
    runner: RunnerConfig = RunnerConfig()
    storage: StorageConfig = StorageConfig()
    # each item is validated once, as the Params of the stage its `stage:` names (a discriminated union
    # over the registry), and dumped with every field of that class
    stages: list[SerializeAsAny[StageParams]] = Field(default_factory=list)

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_params(cls, value: Any) -> list[StageParams]:
        if not isinstance(value, list):
            raise ValueError("stages must be a list of {stage: NAME, ...} items")
        for i, item in enumerate(value):  # readable errors for the two mistakes the union reports tersely
            if isinstance(item, StageParams):
                continue
            if not isinstance(item, dict) or "stage" not in item:
                raise ValueError(f"item {i} needs a 'stage:' key naming a registered stage")
            try:
                registry.get(str(item["stage"]))
            except KeyError as e:
                raise ValueError(f"item {i}: {e.args[0]}") from None
        try:
            out = registry.params_adapter().validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            i = err["loc"][0] if err["loc"] else "?"
            name = value[i].get("stage") if isinstance(i, int) and isinstance(value[i], dict) else "?"
            raise ValueError(f"item {i} ({name}): {_one_line(e, skip=2)}") from None
        ids = [p.id or p.stage for p in out]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"stage ids must be unique; give 'id:' to repeated stages {sorted(dup)}")
        return out

    def stage_ids(self) -> list[str]:
        return [p.id or p.stage for p in self.stages]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def work_hash(self) -> str:
        """Hash of everything that changes the output (not the runner)."""
        data = json.loads(json.dumps(self.model_dump(mode="json"), sort_keys=True))
        data["stages"] = [work_params(p) for p in self.stages]
        data.pop("runner", None)
        data.pop("storage", None)  # how files are reached, not what they hold (the manifest says that)
        data["output"].pop("overwrite", None)
        data["output"].pop("work_path", None)  # where the work lies, not what it holds
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


#: stage parameters that say where and how fast a stage runs, not what it computes
RESOURCE_PARAMS = ("num_cpus", "num_gpus", "concurrency")


def work_params(params: StageParams) -> dict[str, Any]:
    """A stage's parameters that change its output (JSON values; resources and other execution-only
    parameters, such as download's thread counts, left out)."""
    data = params.model_dump(mode="json")
    for k in (*RESOURCE_PARAMS, *params.execution_params):
        data.pop(k, None)
    return data


def _one_line(e: ValidationError, skip: int = 0) -> str:
    """The errors on one line; ``skip``: leading parts of each location to leave out."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"][skip:])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``a.b.c``; list items by index or by stage id/name."""
    keys = dotted.split(".")
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, ".".join(keys[: depth + 1]))]
        else:
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(keys[:-1])} is not a mapping")


def _list_index(node: list, key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        i = int(key)
        if -len(node) <= i < len(node):
            return i
        raise ConfigError(f"--set {where}: index {i} out of range ({len(node)} items)")
    for i, item in enumerate(node):
        if isinstance(item, dict) and key in (item.get("id"), item.get("stage")):
            return i
    raise ConfigError(f"--set {where}: no list item with id or stage {key!r}")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def load_config(source: str | Path | dict | Config, overrides: dict[str, Any] | None = None) -> Config:
    """Read, override and validate a config; raise ConfigError with a one-line message."""
    if isinstance(source, Config):
        if not overrides:
            return source
        source = source.model_dump(mode="json", exclude_unset=True)  # re-validated with the overrides below
    name = "config"
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        data = copy.deepcopy(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the config must be a mapping with input, output, runner, stages")
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{name}: {_one_line(e)}") from None
