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

from edge_runtime.classnames import ClassNameError, check_class_name
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


def _require(mapping, key, kind, where):
    if not isinstance(mapping, dict) or key not in mapping:
        raise BundleError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _tensor(d, where) -> TensorSpec:
    shape = _require(d, "shape", list, where)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise BundleError(f"{where}: 'shape' must be a list of integers, got {shape!r}")
    return TensorSpec(name=str(d.get("name", "")), shape=tuple(int(s) for s in shape),
                      dtype=_require(d, "dtype", str, where), scale=_require(d, "scale", float, where),
                      zero_point=_require(d, "zero_point", int, where))


def _min_runtime(d, where) -> tuple[dict[str, str], str]:
    """The optional min_runtime ({backend: version}) and min_runtime_reason of a stage."""
    raw = d.get("min_runtime") or {}
    reason = d.get("min_runtime_reason") or ""
    if not isinstance(raw, dict) or not isinstance(reason, str):
        raise BundleError(f"{where}: min_runtime must map runtime names to versions, min_runtime_reason be text")
    for name, version in raw.items():
        try:
            version_key(version if isinstance(version, str) else "")
        except ValueError:
            raise BundleError(f"{where}: min_runtime.{name} must be a version such as '2.14.0', got "
                              f"{version!r}") from None
    return {str(k): v for k, v in raw.items()}, reason


def _stage(root: Path, variant: str, n: int, d, manifest_path: Path) -> StageSpec:
    where = f"{manifest_path}: variants.{variant}.stage{n}"
    name = _require(d, "file", str, where)
    if Path(name).name != name:
        raise BundleError(f"{where}: file {name!r} must be a plain file name inside the bundle")
    min_runtime, reason = _min_runtime(d, where)
    return StageSpec(stage=n, file=name, path=root / name, sha256=_require(d, "sha256", str, where).lower(),
                     bytes=_require(d, "bytes", int, where),
                     input=_tensor(_require(d, "input", dict, where), where + ".input"),
                     output=_tensor(_require(d, "output", dict, where), where + ".output"),
                     min_runtime=min_runtime, min_runtime_reason=reason)


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


def _file_spec(root: Path, d, where: str) -> FileSpec:
    name = _require(d, "file", str, where)
    if Path(name).name != name or name in ("", ".", ".."):
        raise BundleError(f"{where}: file {name!r} must be a plain file name inside the bundle")
    return FileSpec(path=root / name, sha256=_require(d, "sha256", str, where).lower(),
                    bytes=_require(d, "bytes", int, where))


def _stage_v2(root: Path, n: int, d, taxonomy, stage2_classes, where: str) -> tuple[tuple[str, ...], Head]:
    """Format /2: a stage's classes and its verified, loaded head."""
    where = f"{where}: stages.stage{n}"
    classes = tuple(_require(d, "classes", list, where))
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise BundleError(f"{where}: classes must be a list of distinct class names")
    if n == 2 and classes != tuple(stage2_classes):
        raise BundleError(f"{where}: classes {list(classes)} differ from stage2_classes {list(stage2_classes)}")
    if n == 1 and classes != ("defective",) and (taxonomy[0] not in classes or not set(classes) <= set(taxonomy)):
        raise BundleError(f"{where}: Stage-1 classes must be [defective] or taxonomy classes including "
                          f"{taxonomy[0]!r}, got {list(classes)}")
    head_d = _require(d, "head", dict, where)
    activations = _require(head_d, "activations", list, where + ".head")
    spec = _file_spec(root, head_d, where + ".head")
    try:
        head = Head.from_bytes(_check_file(spec, keep=True, what="head file"), activations, list(classes))
    except HeadError as exc:
        raise BundleError(f"{spec.path}: {exc}") from None
    return classes, head


def read_signature(root: Path) -> bytes | None:
    """manifest.sig's bytes (None when the bundle has none)."""
    from edge_runtime.signing import MAX_SIG_BYTES, SIGNATURE
    try:
        fh, _ = open_regular(root / SIGNATURE)
        with fh:
            return fh.read(MAX_SIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"{root / SIGNATURE}: cannot read: {exc.strerror or exc}") from None


def _check_signature(root: Path, manifest: bytes, trusted_keys) -> str:
    """The bundle's signature against the trusted keys (edge_runtime/signing.py), before any model is read."""
    from edge_runtime import signing
    try:
        return signing.verify_manifest(manifest, read_signature(root), signing.trusted(trusted_keys), str(root))
    except signing.SignatureError as exc:
        raise BundleError(str(exc)) from None


def load_bundle(path: str | os.PathLike, variant: str | None = None, verify_all: bool = True,
                trusted_keys=None) -> Bundle:
    """Read manifest.yaml, check it, verify the model files' sha256 and pick a variant.

    verify_all: check every variant's files (default), not just the selected one's.
    trusted_keys: an edge_runtime.signing.TrustedKeys (or the path of a .pub file or folder of them): the
    manifest must carry a valid signature (manifest.sig) by one of them, checked before anything else is read.
    None (default): no signature needed.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise BundleError(f"{root}: bundle folder does not exist")
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder (expected a bundle folder containing {MANIFEST})")
    manifest_path = root / MANIFEST
    try:
        fh, _ = open_regular(manifest_path)
        with fh:
            raw = fh.read()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise BundleError(f"{manifest_path}: not a model bundle (no {MANIFEST}); "
                          "build one with `python -m convert`") from None
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BundleError(f"{manifest_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    signed_by = _check_signature(root, raw, trusted_keys) if trusted_keys is not None else None
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BundleError(f"{manifest_path}: not valid YAML: {exc}") from exc
    where = str(manifest_path)
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: expected a mapping at the top level")
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise BundleError(f"{where}: unsupported bundle format {fmt!r} (this runtime reads "
                          f"{' and '.join(map(repr, FORMATS))})")

    taxonomy = tuple(_require(manifest, "taxonomy", list, where))
    stage2_classes = tuple(_require(manifest, "stage2_classes", list, where))
    for key, names in (("taxonomy", taxonomy), ("stage2_classes", stage2_classes)):
        if not all(isinstance(n, str) for n in names):
            raise BundleError(f"{where}: {key} must be a list of class names (text), got {list(names)!r}")
        try:        # class names become folder names and CSV cells downstream (edge_runtime/classnames.py)
            for i, n in enumerate(names):
                check_class_name(n, f"{key}[{i}]")
        except ClassNameError as exc:
            raise BundleError(f"{where}: {exc}") from None
    if not taxonomy or len(set(taxonomy)) != len(taxonomy):
        raise BundleError(f"{where}: taxonomy must be a non-empty list of distinct names")
    unknown = [c for c in stage2_classes if c not in taxonomy[1:]]
    if not stage2_classes or unknown:
        raise BundleError(f"{where}: stage2_classes must be defect classes from the taxonomy (bad: {unknown})")
    inp = _require(manifest, "input", dict, where)
    if fmt == FORMAT_V1:
        height, width = _require(inp, "height", int, where + ": input"), _require(inp, "width", int, where + ": input")
    gating = _require(manifest, "gating", dict, where)
    threshold = _require(gating, "stage1_threshold", float, where + ": gating")
    floor = _require(gating, "stage2_review_floor", float, where + ": gating")
    if not 0.0 <= threshold <= 1.0 or not 0.0 <= floor <= 1.0:
        raise BundleError(f"{where}: gating values must lie in [0, 1] (got {threshold}, {floor})")

    backbones = manifest.get("backbones") or {}
    source_run = manifest.get("source_run")
    if not isinstance(backbones, dict) or not (source_run is None or isinstance(source_run, str)):
        raise BundleError(f"{where}: backbones must be a mapping and source_run a path")

    variants_raw = _require(manifest, "variants", dict, where)
    if not variants_raw:
        raise BundleError(f"{where}: no model variants listed")
    chosen = variant or manifest.get("default_variant") or next(iter(variants_raw))
    if not isinstance(chosen, str) or chosen not in variants_raw:
        raise BundleError(f"{where}: no variant {chosen!r} in this bundle (available: {', '.join(variants_raw)})")

    specs: dict[str, dict[int, StageSpec]] = {}
    for name, stages in variants_raw.items():
        specs[name] = {n: _stage(root, name, n, _require(stages, f"stage{n}", dict, f"{where}: variants.{name}"),
                                 manifest_path) for n in (1, 2)}
    chosen_specs = specs[chosen]
    heads: dict[int, Head | None] = {1: None, 2: None}
    stage_classes = {1: ("defective",), 2: tuple(stage2_classes)}
    replay = None
    if fmt == FORMAT_V1:
        sizes = {1: (height, width), 2: (height, width)}
        for n, spec in chosen_specs.items():
            if spec.input.shape != (1, height, width, 3):
                raise BundleError(f"{spec.path}: input shape {spec.input.shape} does not match the manifest input "
                                  f"{(1, height, width, 3)}")
    else:
        stages = _require(manifest, "stages", dict, where)
        sizes = {}
        for n, spec in chosen_specs.items():
            stage_classes[n], heads[n] = _stage_v2(root, n, _require(stages, f"stage{n}", dict, where + ": stages"),
                                                   taxonomy, stage2_classes, where)
            shape = spec.input.shape
            if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or min(shape[1:3]) < 8:
                raise BundleError(f"{spec.path}: input shape {shape} is not one image (1, H, W, 3)")
            sizes[n] = (shape[1], shape[2])
            if spec.output.shape[-1:] != (heads[n].features,):
                raise BundleError(f"{spec.path}: the backbone emits {spec.output.shape[-1:]} features but the "
                                  f"Stage-{n} head takes {heads[n].features}")
        if manifest.get("replay") is not None:
            replay = _file_spec(root, manifest["replay"], where + ": replay")
            if verify_all:
                _check_file(replay, keep=False, what="replay set")
    if heads[2] is None and chosen_specs[2].output.shape[-1:] != (len(stage2_classes),):
        raise BundleError(f"{chosen_specs[2].path}: {(chosen_specs[2].output.shape or ('no',))[-1]} outputs but "
                          f"{len(stage2_classes)} stage2_classes")

    model_bytes = {n: _check_file(spec, keep=True) for n, spec in chosen_specs.items()}
    if verify_all:
        for name, stages_of in specs.items():
            if name != chosen:
                for spec in stages_of.values():
                    _check_file(spec, keep=False)

    return Bundle(root=root.resolve(), manifest=manifest, variant=chosen, variants=tuple(variants_raw),
                  taxonomy=taxonomy, stage2_classes=stage2_classes, image_sizes=sizes,
                  stage1_threshold=threshold, stage2_review_floor=floor,
                  stage1=chosen_specs[1], stage2=chosen_specs[2], specs=specs,
                  backbones={str(k): str(v) for k, v in backbones.items()}, source_run=source_run,
                  bundle_id=sha256_bytes(raw), signed_by=signed_by, heads=heads, stage_classes=stage_classes, replay=replay, format=fmt,
                  _model_bytes=model_bytes)


def file_entry(data: bytes) -> dict:
    """How the manifest pins a file: its sha256 and size."""
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


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
        for name, data in {**files, MANIFEST: yaml.safe_dump(manifest, sort_keys=False).encode("utf-8")}.items():
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
