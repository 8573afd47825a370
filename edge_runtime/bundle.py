"""Load and check a model bundle (the folder written by `python -m convert` or by adaptation; the format is
described in convert/bundle.py), and write one atomically (write_bundle_dir).

Everything the board needs to know comes from manifest.yaml: the taxonomy, the order of the Stage-2
outputs, each stage's input size, the calibrated gating and, per variant, each model file with its sha256 and
its input/output quantization. Format /2 adds per stage what the stage is (backbone, input size, the classes
its head outputs) and the head file applied in numpy to the backbone's features (edge_runtime/head.py), plus
an optional replay set of public training features for adaptation. A bundle is refused whole (BundleError
naming the file and the problem) when the manifest is missing or malformed, or when any file listed in it is
missing or does not match its sha256: a board never runs a model other than the one that was validated.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edge_runtime import strict
from edge_runtime.classnames import CLASS, DEFECTIVE, ClassNameError, check_taxonomy
from edge_runtime.digest import sha256_bytes, sha256_file
from edge_runtime.head import Head, HeadError
from edge_runtime.interpreter import version_key
from edge_runtime.safeopen import open_regular

FORMAT_V1 = "sem-inspect-bundle/1"     # one end-to-end model per stage, one input size
FORMAT = "sem-inspect-bundle/2"        # per stage: backbone + numpy head, its own input size
FORMATS = (FORMAT_V1, FORMAT)
MANIFEST = "manifest.yaml"
REPLAY = "replay.npz"


class BundleError(RuntimeError):
    """The bundle cannot be used; the message names the file and says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int


@dataclass(frozen=True)
class StageSpec:
    stage: int
    file: str
    path: Path
    sha256: str
    bytes: int
    input: TensorSpec
    output: TensorSpec
    # Oldest interpreter versions that run this model ({backend: version}, from `python -m convert`; empty in
    # bundles written before they were recorded) and why; checked when an interpreter is built for it.
    min_runtime: dict[str, str] = field(default_factory=dict)
    min_runtime_reason: str = ""


@dataclass(frozen=True)
class FileSpec:
    """A file of the bundle other than a model (a head, the replay set), pinned by the manifest."""
    path: Path
    sha256: str
    bytes: int


@dataclass
class Bundle:
    root: Path
    manifest: dict
    variant: str
    variants: tuple[str, ...]
    taxonomy: tuple[str, ...]
    stage2_classes: tuple[str, ...]
    image_sizes: dict[int, tuple[int, int]]    # stage -> (height, width) of its input
    stage1_threshold: float
    stage2_review_floor: float
    stage1: StageSpec
    stage2: StageSpec
    specs: dict[str, dict[int, StageSpec]] = field(default_factory=dict, repr=False)   # every variant's stages
    backbones: dict[str, str] = field(default_factory=dict)    # {"stage1": name, "stage2": name} (informative)
    source_run: str | None = None                              # the training run the bundle was converted from
    # sha256 of manifest.yaml: the model version (the manifest pins every model file's sha256). Results record it.
    bundle_id: str = ""
    signed_by: str | None = None        # the trusted key id whose signature was checked at load (None: not asked)
    # A bundle this board derived (signed by its board key; edge_runtime/signing.py): its signed parent.
    derivation: object | None = None
    # Format /2: each stage's head (None: the model's output is already the stage's probabilities) and the
    # classes the stage outputs (Stage 1 of format /1: ("defective",), one sigmoid unit).
    heads: dict[int, Head | None] = field(default_factory=dict, repr=False)
    stage_classes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    replay: FileSpec | None = None
    format: str = FORMAT_V1
    # Verified model bytes of the selected variant (what was hashed is exactly what gets run).
    _model_bytes: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def clean_label(self) -> str:
        return self.taxonomy[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """The largest stage input (height, width): what an image is decoded for."""
        return max(self.image_sizes.values(), key=lambda hw: hw[0] * hw[1])

    def stage(self, n: int, variant: str | None = None) -> StageSpec:
        if variant is None or variant == self.variant:
            return {1: self.stage1, 2: self.stage2}[n]
        if variant not in self.specs:
            raise BundleError(f"{self.root / MANIFEST}: no variant {variant!r} in this bundle "
                              f"(available: {', '.join(self.variants)})")
        return self.specs[variant][n]

    def files(self) -> list[str]:
        """Every file the manifest pins (each variant's models, the heads, the replay set), by name."""
        names = [spec.file for stages in self.specs.values() for spec in stages.values()]
        if self.format != FORMAT_V1:
            names += [self.manifest["stages"][f"stage{n}"]["head"]["file"] for n in (1, 2)]
        if self.replay is not None:
            names.append(self.replay.path.name)
        return list(dict.fromkeys(names))

    def model_bytes(self, n: int, variant: str | None = None) -> bytes:
        """The model file of stage n, sha256-checked. The selected variant's bytes were read and checked when
        the bundle was loaded; another variant's are read and checked now (load with verify_all=False to
        hash each file once when every variant is read)."""
        if variant is None or variant == self.variant:
            return self._model_bytes[n]
        return _check_file(self.stage(n, variant), keep=True)


# ---- the manifest's schema (edge_runtime/strict.py) --------------------------------------------------------

def _plain_name(name: str, path: str) -> None:
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{path} must be a plain file name inside the bundle, got {strict.shown(name)}")


def _version(version: str, path: str) -> None:
    try:
        version_key(version)
    except ValueError:
        raise ValueError(f"{path} must be a version such as '2.14.0', got {strict.shown(version)}") from None


_FILE = strict.Text(rule=_plain_name)
_SHA256 = strict.Text(pattern="[0-9a-fA-F]{64}", describe="64 hex digits (a sha256)")
_COUNT = strict.Number(low=0, integer=True)
_PINNED = {"file": _FILE, "sha256": _SHA256, "bytes": _COUNT}     # how the manifest pins a file
_TENSOR = strict.Keys({"name": strict.Field(strict.Text(), ""), "shape": strict.ListOf(strict.Number(integer=True)),
                       "dtype": strict.Text(), "scale": strict.Number(), "zero_point": strict.Number(integer=True)})
_MODEL = strict.Keys({**_PINNED, "input": _TENSOR, "output": _TENSOR,
                      "ops": strict.Field(strict.MapOf(value=strict.Anything()), None),
                      # oldest interpreters that run the model ({backend: version}; absent in older bundles)
                      "min_runtime": strict.Field(strict.Optional(strict.MapOf(value=strict.Text(rule=_version, describe="a version such as '2.14.0'"))), None),
                      "min_runtime_reason": strict.Field(strict.Optional(strict.Text()), None)})
_IMAGE_SIZE = strict.ListOf(strict.Number(low=1, integer=True), min_len=2, max_len=2)
_STAGE_V2 = strict.Keys({
    "backbone": strict.Field(strict.Text(), ""),
    "image_size": strict.Field(strict.Optional(_IMAGE_SIZE), None),    # (height, width): checked against the model
    "classes": strict.ListOf(CLASS, min_len=1, distinct=True),
    "head": strict.Keys({**_PINNED, "activations": strict.ListOf(strict.Text())})})
_INPUT = strict.Keys({"channels": strict.Field(strict.Number(low=1, integer=True), 3),
                      "preprocessing": strict.Field(strict.Text(), "")})
_INPUT_V1 = strict.Keys({**_INPUT.fields, "height": strict.Number(low=1, integer=True),
                         "width": strict.Number(low=1, integer=True)})
# The top level is open: informative keys (created, tools, calibration, files, source, parent, adapted, ...) and
# the writer's `extra` are kept as they are; every section the reader acts on is closed.
_MANIFEST = strict.Keys({
    "format": strict.Text(choices=FORMATS),
    "taxonomy": strict.ListOf(CLASS),
    "stage2_classes": strict.ListOf(CLASS),
    "gating": strict.Keys({"stage1_threshold": strict.Number(0, 1), "stage2_review_floor": strict.Number(0, 1)}),
    "variants": strict.MapOf(value=strict.Keys({"stage1": _MODEL, "stage2": _MODEL}), min_len=1),
    "default_variant": strict.Field(strict.Optional(strict.Text()), None),
    "backbones": strict.Field(strict.Optional(strict.MapOf(value=strict.Anything())), None),
    "source_run": strict.Field(strict.Optional(strict.Text()), None),
}, extra="keep")
_MANIFEST_V1 = strict.Keys({**_MANIFEST.fields, "input": _INPUT_V1}, extra="keep")
_MANIFEST_V2 = strict.Keys({**_MANIFEST.fields, "input": _INPUT,
                            "stages": strict.Keys({"stage1": _STAGE_V2, "stage2": _STAGE_V2}),
                            "replay": strict.Field(strict.Optional(strict.Keys(_PINNED, extra="keep")), None)},
                           extra="keep")


def _tensor(d: dict) -> TensorSpec:
    return TensorSpec(name=d["name"], shape=tuple(d["shape"]), dtype=d["dtype"], scale=d["scale"],
                      zero_point=d["zero_point"])


def _stage(root: Path, n: int, d: dict) -> StageSpec:
    return StageSpec(stage=n, file=d["file"], path=root / d["file"], sha256=d["sha256"].lower(), bytes=d["bytes"],
                     input=_tensor(d["input"]), output=_tensor(d["output"]), min_runtime=dict(d["min_runtime"] or {}),
                     min_runtime_reason=d["min_runtime_reason"] or "")


def _file_spec(root: Path, d: dict) -> FileSpec:
    return FileSpec(path=root / d["file"], sha256=d["sha256"].lower(), bytes=d["bytes"])


def _check_file(spec: StageSpec | FileSpec, keep: bool, what: str = "model file") -> bytes | None:
    """Hash one file against the manifest. Returns its bytes when `keep`."""
    try:
        if keep:
            fh, _ = open_regular(spec.path)     # never blocks: a FIFO in place of a model is refused
            with fh:
                data = fh.read()
            digest = sha256_bytes(data)
        else:
            data, digest = None, sha256_file(spec.path)
    except FileNotFoundError:
        raise BundleError(f"{spec.path}: {what} listed in the manifest is missing") from None
    except OSError as exc:
        raise BundleError(f"{spec.path}: cannot read {what}: {exc.strerror or exc}") from exc
    if digest != spec.sha256:
        raise BundleError(f"{spec.path}: sha256 mismatch (manifest {spec.sha256[:16]}..., file {digest[:16]}...); "
                          f"the {what} was changed or damaged, refusing to run it")
    return data


def read_verified(spec: StageSpec | FileSpec, what: str) -> bytes:
    """A file of the bundle, read once and checked against the manifest's sha256 (BundleError otherwise)."""
    return _check_file(spec, keep=True, what=what)


def _read_optional(path: Path, limit: int | None = None) -> bytes | None:
    """A small file of the bundle beside the manifest (None when there is none)."""
    try:
        fh, _ = open_regular(path)
        with fh:
            return fh.read() if limit is None else fh.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_signature(root: Path) -> bytes | None:
    """manifest.sig's bytes (None when the bundle has none)."""
    from edge_runtime.signing import MAX_SIG_BYTES, SIGNATURE
    return _read_optional(root / SIGNATURE, MAX_SIG_BYTES)


def release_signature(root: Path) -> bytes | None:
    """The signature that states a bundle folder's release: manifest.sig, or for a bundle a board derived (no
    manifest.sig of its own), its parent's (parent.sig): a derived bundle is its parent's release."""
    from edge_runtime.signing import MAX_SIG_BYTES, PARENT_SIGNATURE
    sig = read_signature(root)
    return sig if sig is not None else _read_optional(root / PARENT_SIGNATURE, MAX_SIG_BYTES)


def _check_signature(root: Path, manifest: bytes, trusted_keys, board_key):
    """The bundle's signature against the trusted keys (edge_runtime/signing.py), before any model is read:
    manifest.sig, or for a bundle without one, a derivation by this board's own key (board_key) of a parent a
    trusted key signed. Returns (the key id that signed it, the Derivation or None)."""
    from edge_runtime import signing
    try:
        keys, signature = signing.trusted(trusted_keys), read_signature(root)
        if signature is not None or not (root / signing.DERIVATION).exists():
            return signing.verify_manifest(manifest, signature, keys, str(root)), None
        derivation = signing.verify_derivation(
            manifest, _read_optional(root / signing.DERIVATION, signing.MAX_SIG_BYTES),
            _read_optional(root / signing.PARENT_MANIFEST), _read_optional(root / signing.PARENT_SIGNATURE,
                                                                           signing.MAX_SIG_BYTES),
            keys, board_key, str(root))
        return derivation.board_key_id, derivation
    except signing.SignatureError as exc:
        raise BundleError(str(exc)) from None


# What runs a backbone: a bundle a board derives keeps these exactly as its signed parent has them (it may change
# only the heads, their classes, the gating and the replay set).
_BACKBONE_KEYS = ("format", "input", "variants")
_BACKBONE_STAGE_KEYS = ("backbone", "image_size")


def _check_backbones(manifest: dict, parent_raw: bytes, parent_id: str, root: Path) -> None:
    """A derived bundle's backbones against its signed parent's: the same model files (sha256, quantization),
    input and preprocessing, or BundleError (one line)."""
    parent = yaml.safe_load(parent_raw.decode("utf-8"))     # verified by the parent's signature
    parent = parent if isinstance(parent, dict) else {}
    differ = [k for k in _BACKBONE_KEYS if manifest.get(k) != parent.get(k)]
    for n in (1, 2):
        mine, theirs = ((m.get("stages") or {}).get(f"stage{n}") or {} for m in (manifest, parent))
        differ += [f"stages.stage{n}.{k}" for k in _BACKBONE_STAGE_KEYS if mine.get(k) != theirs.get(k)]
    if differ:
        raise BundleError(f"{root}: adapted bundle: its backbones are not its parent {parent_id[:16]}'s "
                          f"({', '.join(differ)} differ); a board may change only heads and gating")


# ---- read / parse / verify ------------------------------------------------------------------------------------

def read_manifest(root: Path) -> bytes:
    """manifest.yaml's bytes (BundleError when the folder or the file is missing or unreadable)."""
    if not root.exists():
        raise BundleError(f"{root}: bundle folder does not exist")
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder (expected a bundle folder containing {MANIFEST})")
    manifest_path = root / MANIFEST
    try:
        fh, _ = open_regular(manifest_path)
        with fh:
            return fh.read()
    except FileNotFoundError:
        raise BundleError(f"{manifest_path}: not a model bundle (no {MANIFEST}); "
                          "build one with `python -m convert`") from None
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read: {exc.strerror or exc}") from exc


def parse_manifest(root: Path, raw: bytes, variant: str | None = None) -> Bundle:
    """The manifest checked (strict schema, taxonomy, stage sizes) into a Bundle whose files are not read yet."""
    where = str(root / MANIFEST)
    try:
        manifest = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise BundleError(f"{where}: not valid YAML: {exc}") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(manifest, dict) and fmt not in FORMATS:
        raise BundleError(f"{where}: unsupported bundle format {fmt!r} (this runtime reads "
                          f"{' and '.join(map(repr, FORMATS))})")
    m = strict.read(manifest, _MANIFEST_V1 if fmt == FORMAT_V1 else _MANIFEST_V2, where, error=BundleError)
    stages = m.get("stages") or {}
    taxonomy, stage2_classes = tuple(m["taxonomy"]), tuple(m["stage2_classes"])
    stage1_classes = tuple(stages["stage1"]["classes"]) if stages else DEFECTIVE
    try:
        check_taxonomy(taxonomy, stage2_classes, stage1_classes, where)
    except ClassNameError as exc:
        raise BundleError(str(exc)) from None
    if stages and tuple(stages["stage2"]["classes"]) != stage2_classes:
        raise BundleError(f"{where}: stages.stage2: classes {stages['stage2']['classes']} differ from "
                          f"stage2_classes {list(stage2_classes)}")

    variants = m["variants"]
    chosen = variant or m["default_variant"] or next(iter(variants))
    if chosen not in variants:
        raise BundleError(f"{where}: no variant {chosen!r} in this bundle (available: {', '.join(variants)})")
    specs = {name: {n: _stage(root, n, entry[f"stage{n}"]) for n in (1, 2)} for name, entry in variants.items()}
    sizes = {n: _input_size(spec, m, n, where) for n, spec in specs[chosen].items()}
    return Bundle(root=root.resolve(), manifest=manifest, variant=chosen, variants=tuple(variants),
                  taxonomy=taxonomy, stage2_classes=stage2_classes, image_sizes=sizes,
                  stage1_threshold=m["gating"]["stage1_threshold"], stage2_review_floor=m["gating"]["stage2_review_floor"],
                  stage1=specs[chosen][1], stage2=specs[chosen][2], specs=specs,
                  backbones={str(k): str(v) for k, v in (m["backbones"] or {}).items()}, source_run=m["source_run"],
                  bundle_id=sha256_bytes(raw), stage_classes={1: stage1_classes, 2: stage2_classes},
                  replay=_file_spec(root, m["replay"]) if m.get("replay") is not None else None, format=fmt)


def _input_size(spec: StageSpec, m: dict, n: int, where: str) -> tuple[int, int]:
    """A stage's input (height, width): the model's input shape, which must agree with what the manifest says
    (format /1: `input`; format /2: the stage's image_size, when present)."""
    shape = spec.input.shape
    if m["format"] == FORMAT_V1:
        expected = (1, m["input"]["height"], m["input"]["width"], 3)
        if shape != expected:
            raise BundleError(f"{spec.path}: input shape {shape} does not match the manifest input {expected}")
        return expected[1], expected[2]
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or min(shape[1:3]) < 8:
        raise BundleError(f"{spec.path}: input shape {shape} is not one image (1, H, W, 3)")
    written = m["stages"][f"stage{n}"]["image_size"]
    if written is not None and tuple(written) != shape[1:3]:
        raise BundleError(f"{where}: stages.stage{n}.image_size {list(written)} does not match the Stage-{n} model's "
                          f"input shape {shape} ({spec.path.name})")
    return shape[1], shape[2]


def _load_head(bundle: Bundle, n: int) -> Head:
    d = bundle.manifest["stages"][f"stage{n}"]["head"]
    spec = _file_spec(bundle.root, d)
    try:
        return Head.from_bytes(_check_file(spec, keep=True, what="head file"), d["activations"],
                               list(bundle.stage_classes[n]))
    except HeadError as exc:
        raise BundleError(f"{spec.path}: {exc}") from None


def verify_files(bundle: Bundle, verify_all: bool = True) -> Bundle:
    """Every file the manifest pins, against its sha256: the selected variant's models (kept: what was hashed is
    what runs), the heads (loaded, and checked to fit their backbones), and with verify_all the replay set and
    every other variant's models."""
    if bundle.format != FORMAT_V1:
        for n, spec in ((1, bundle.stage1), (2, bundle.stage2)):
            head = bundle.heads[n] = _load_head(bundle, n)
            if spec.output.shape[-1:] != (head.features,):
                raise BundleError(f"{spec.path}: the backbone emits {spec.output.shape[-1:]} features but the "
                                  f"Stage-{n} head takes {head.features}")
        if bundle.replay is not None and verify_all:
            _check_file(bundle.replay, keep=False, what="replay set")
    else:
        bundle.heads = {1: None, 2: None}
    stage2 = bundle.stage2
    if bundle.heads[2] is None and stage2.output.shape[-1:] != (len(bundle.stage2_classes),):
        raise BundleError(f"{stage2.path}: {(stage2.output.shape or ('no',))[-1]} outputs but "
                          f"{len(bundle.stage2_classes)} stage2_classes")
    bundle._model_bytes = {n: _check_file(spec, keep=True) for n, spec in ((1, bundle.stage1), (2, stage2))}
    if verify_all:
        for name, stages_of in bundle.specs.items():
            if name != bundle.variant:
                for spec in stages_of.values():
                    _check_file(spec, keep=False)
    return bundle


def load_bundle(path: str | os.PathLike, variant: str | None = None, verify_all: bool = True,
                trusted_keys=None, board_key=None) -> Bundle:
    """Read manifest.yaml, check its signature (when keys are given), parse it, and verify the files' sha256.

    verify_all: check every variant's files (default), not just the selected one's.
    trusted_keys: an edge_runtime.signing.TrustedKeys (or the path of a .pub file or folder of them): the
    manifest must carry a valid signature (manifest.sig) by one of them, checked before anything else is read.
    None (default): no signature needed.
    board_key: this board's key (edge_runtime/signing.py board_public_key): with trusted_keys, a bundle without
    manifest.sig is accepted when this board derived it from a trusted parent, keeping its backbones.
    """
    root = Path(path).expanduser()
    raw = read_manifest(root)
    signed_by, derivation = (_check_signature(root, raw, trusted_keys, board_key) if trusted_keys is not None
                             else (None, None))
    bundle = parse_manifest(root, raw, variant)
    if derivation is not None:
        _check_backbones(bundle.manifest, derivation.parent_manifest, derivation.parent_id, root)
    bundle.signed_by, bundle.derivation = signed_by, derivation
    return verify_files(bundle, verify_all)


def file_entry(data: bytes) -> dict:
    """How the manifest pins a file: its sha256 and size."""
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def dump_manifest(manifest: dict) -> bytes:
    """manifest.yaml's bytes as write_bundle_dir writes them (what a signature made before writing covers)."""
    return yaml.safe_dump(manifest, sort_keys=False).encode("utf-8")


def write_bundle_dir(out_dir: str | os.PathLike, files: dict[str, bytes], manifest: dict) -> Path:
    """Write a bundle folder whole or not at all: every file and manifest.yaml go to a temporary sibling,
    are fsynced, and the folder is renamed into place (an existing bundle there is replaced whole). A failure
    (full disk included) leaves nothing behind. Returns the bundle path."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)       # mkdtemp's 0700 would hide the bundle from the service's user
    try:
        for name, data in {**files, MANIFEST: dump_manifest(manifest)}.items():
            if Path(name).name != name:
                raise ValueError(f"bundle file {name!r} must be a plain file name")
            with open(tmp / name, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
