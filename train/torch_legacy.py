"""Read PyTorch's legacy (pre-1.6, non-zip) ``torch.save`` files with the standard library.

The format is a sequence of pickles — magic number, protocol version, system info, the object
whose tensors point at storages through ``persistent_id``s, and the list of storage keys — followed
by each storage's raw bytes, prefixed by its element count as a little-endian int64
(``torch/serialization.py``, ``_legacy_save``). Only tensors of plain dtypes are rebuilt, as numpy
arrays; nothing else from the pickle is imported or executed.
"""

from __future__ import annotations

import collections
import pickle
import struct

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _TensorRef:
    def __init__(self, storage_key, offset, size, stride):
        self.storage_key, self.offset = storage_key, offset
        self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_):
    return _TensorRef(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}:
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        # ('storage', storage_type, root_key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return (pid[2], pid[1].name)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Return ``{name: array}`` from a legacy-format PyTorch state dict file."""
    with open(path, "rb") as fh:
        try:
            magic = pickle.load(fh)
        except Exception as e:  # noqa: BLE001 - any failure means "not this format"
            raise ValueError(f"{path}: not a legacy PyTorch file ({e})") from e
        if magic != _MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch file (bad magic number)")
        pickle.load(fh)  # protocol version
        sys_info = pickle.load(fh)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian PyTorch files are not supported")
        refs = _Unpickler(fh).load()
        keys = pickle.load(fh)
        storages: dict[str, np.ndarray] = {}
        dtypes = {}
        for ref in refs.values():
            if isinstance(ref, _TensorRef):
                dtypes[ref.storage_key[0]] = _STORAGE_DTYPES[ref.storage_key[1]]
        for key in keys:
            (count,) = struct.unpack("<q", fh.read(8))
            dtype = np.dtype(dtypes[key])
            buf = fh.read(count * dtype.itemsize)
            if len(buf) != count * dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            storages[key] = np.frombuffer(buf, dtype=dtype)
    out = {}
    for name, ref in refs.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = storages[ref.storage_key[0]]
        itemsize = flat.dtype.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], shape=ref.size, strides=[s * itemsize for s in ref.stride]
        ).copy()
    return out
