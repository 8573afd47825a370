"""A new bundle made from an existing one: the same backbones, new heads, gating or replay set.

Every file of the source bundle is read sha256-checked and written again with the new parts, through the one
atomic bundle writer (edge_runtime.bundle.write_bundle_dir): the result is a complete bundle folder, or
nothing. Its manifest names the bundle it came from (`parent`), so a result recorded by the new bundle can be
traced to the one it adapted. With a board key (service.yaml `board_key:`) the board signs what it derived
(derivation.sig, edge_runtime/signing.py) and keeps its signed parent's manifest and signature as they were
(parent.manifest.yaml, parent.sig, pinned under `files:`; carried over from a parent that is itself derived), so
a board with trusted keys runs the bundle it derived and no other board's.
"""
from __future__ import annotations

import copy
import datetime as _dt
from pathlib import Path

from edge_runtime.bundle import (
    MANIFEST,
    REPLAY,
    Bundle,
    BundleError,
    FileSpec,
    dump_manifest,
    file_entry,
    read_manifest,
    read_signature,
    read_verified,
    write_bundle_dir,
)
from edge_runtime.digest import sha256_bytes
from edge_runtime.head import Head


def _source_files(bundle: Bundle) -> dict[str, bytes]:
    """Every file the manifest pins, verified."""
    files: dict[str, bytes] = {}
    for variant, stages in bundle.specs.items():
        for n, spec in stages.items():
            files[spec.file] = bundle.model_bytes(n, variant)
    for n in (1, 2):
        head = (bundle.manifest.get("stages") or {}).get(f"stage{n}", {}).get("head")
        if head:
            files[head["file"]] = read_verified(FileSpec(bundle.root / head["file"], head["sha256"], head["bytes"]),
                                                "head file")
    if bundle.replay is not None:
        files[bundle.replay.path.name] = read_verified(bundle.replay, "replay set")
    for name, entry in (bundle.manifest.get("files") or {}).items():
        if isinstance(entry, dict) and Path(name).name == name:
            files[name] = read_verified(FileSpec(bundle.root / name, str(entry.get("sha256", "")).lower(),
                                                 int(entry.get("bytes", 0))), "file")
    return files


def derive_bundle(bundle: Bundle, out_dir, *, heads: dict[int, Head] | None = None,
                  gating: dict | None = None, replay: tuple[bytes, dict] | None = None,
                  extra: dict | None = None, board_key=None) -> Path:
    """Write `out_dir`: `bundle` with its heads, gating and replay set replaced where given, and `extra` keys
    added to the manifest, signed as this board's derivation with `board_key` (its private key's path) when
    given. Only format-/2 bundles have heads to replace."""
    if heads and bundle.format != "sem-inspect-bundle/2":
        raise BundleError(f"{bundle.root / MANIFEST}: format {bundle.format} has no separate heads to refit; "
                          "convert the run again with this version to get a format-/2 bundle")
    files = _source_files(bundle)
    manifest = copy.deepcopy(bundle.manifest)
    for n, head in (heads or {}).items():
        data = head.to_bytes()
        entry = manifest["stages"][f"stage{n}"]
        if head.features != bundle.heads[n].features or not set(head.classes) <= set(bundle.taxonomy) | {"defective"}:
            raise BundleError(f"new Stage-{n} head ({list(head.classes)}, {head.features} features) does not fit "
                              f"the bundle ({list(bundle.taxonomy)}, {bundle.heads[n].features} features)")
        files[entry["head"]["file"]] = data
        entry["head"].update(file_entry(data), activations=list(head.activations))
        entry["classes"] = list(head.classes)
        if n == 2:          # a head may learn a taxonomy class the bundle lacked (adaptation): Stage 2's order
            manifest["stage2_classes"] = list(head.classes)
    if gating:
        manifest["gating"].update({k: float(v) for k, v in gating.items()})
    if replay is not None:
        data, description = replay
        files[REPLAY] = data
        manifest["replay"] = {"file": REPLAY, **file_entry(data), **description}
    manifest["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest.update(extra or {})
    if board_key is not None:
        files.update(_signed_parent(bundle, files, manifest))
    raw = dump_manifest(manifest)
    if board_key is not None:
        from edge_runtime.signing import DERIVATION, PARENT_MANIFEST, derivation_for
        files[DERIVATION] = derivation_for(raw, files[PARENT_MANIFEST], board_key)
    return write_bundle_dir(out_dir, files, manifest)


def _signed_parent(bundle: Bundle, files: dict[str, bytes], manifest: dict) -> dict[str, bytes]:
    """parent.manifest.yaml and parent.sig of the derived bundle, pinned in `manifest`: the source's own manifest
    and signature, or the ones a source this board derived carries (it has no manifest.sig). An unsigned
    source is named with no parent.sig: a board with trusted keys refuses what is derived from it."""
    from edge_runtime.signing import PARENT_MANIFEST, PARENT_SIGNATURE
    signature = read_signature(bundle.root)
    if signature is None and PARENT_MANIFEST in files:
        return {}       # carried over from the source's `files:`
    raw = read_manifest(bundle.root)
    if sha256_bytes(raw) != bundle.bundle_id:
        raise BundleError(f"{bundle.root / MANIFEST}: changed while it was being adapted")
    parent = {PARENT_MANIFEST: raw, **({PARENT_SIGNATURE: signature} if signature is not None else {})}
    pinned = manifest["files"] = dict(manifest.get("files") or {})
    pinned.pop(PARENT_SIGNATURE, None)
    pinned.update({name: file_entry(data) for name, data in parent.items()})
    return parent
