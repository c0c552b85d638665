"""manifest.json: read + validate (readers refuse anything but a complete manifest of this schema) and atomic writes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import UserInputError, load_json_object
from .atomic import atomic_write_json
from .schema import FORMAT, REQUIRED_MANIFEST_KEYS, REQUIRED_SHARD_KEYS, SCHEMA_VERSION, manifest_path


def read_manifest(store: str | Path) -> dict[str, Any]:
    """Load STORE/manifest.json and check it is a complete store of this schema version.

    Raises UserInputError (naming the manifest) when the file is missing, unreadable, of another format or schema
    version, marked incomplete, lacks a required key, or its shards do not tile ``[0, n_cells)``.
    """
    path = manifest_path(store)
    if not Path(store).is_dir():
        raise UserInputError("store directory not found", path=str(store))
    manifest = load_json_object(path, "manifest", missing=(
        "no manifest.json: not a grnformer_ds store, or its build has not finished (run build_store.py again, or "
        "its --finalize step)"))
    validate_manifest(manifest, str(path))
    return manifest


def validate_manifest(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise UserInputError("manifest is not a JSON object", path=where)
    if manifest.get("format") != FORMAT:
        raise UserInputError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}", path=where)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserInputError(
            f"schema_version {manifest.get('schema_version')!r} is not supported (this reader reads "
            f"{SCHEMA_VERSION}); rebuild the store with this version of build_store.py", path=where)
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise UserInputError(f"incomplete manifest: missing {', '.join(missing)}", path=where)
    if manifest["complete"] is not True:
        raise UserInputError("store is marked incomplete (its build has not finished)", path=where)
    offset = 0
    for i, shard in enumerate(manifest["shards"]):
        miss = [k for k in REQUIRED_SHARD_KEYS if k not in shard]
        if miss:
            raise UserInputError(f"incomplete manifest: shard {i} lacks {', '.join(miss)}", path=where)
        if shard["cell_offset"] != offset:
            raise UserInputError(f"shard {i} cell_offset {shard['cell_offset']} != {offset}", path=where)
        offset += shard["n_cells"]
    if offset != manifest["n_cells"]:
        raise UserInputError(f"shards hold {offset} cells but n_cells is {manifest['n_cells']}", path=where)


def write_manifest(store: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest atomically (tmp file + os.replace): readers never see a torn manifest."""
    atomic_write_json(manifest_path(store), dict(manifest))


def update_manifest_assets(store: str | Path, name: str, asset: Mapping[str, Any]) -> dict[str, Any]:
    """Record a later step's asset (e.g. ``"grn"``) under ``manifest["assets"][name]``, atomically; returns the
    manifest.

    The store must already be complete. Last writer wins for concurrent updates of different names, so run the
    asset builders one after another.
    """
    manifest = read_manifest(store)
    manifest.setdefault("assets", {})[name] = dict(asset)
    write_manifest(store, manifest)
    return manifest
