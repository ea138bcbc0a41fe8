"""Allow-list unpicklers: read ClipCap feature pickles and OpenAI TorchScript weights without running their code.

    python -c "from foodcap.safe_pickle import load_pickle; print(load_pickle('RN50x4_RN_train.pkl').keys())"

`pickle.load` calls whatever the file names, so a feature file from the internet could run any command.
`load_pickle` only resolves the globals listed here: torch tensor rebuilders (storages are read with
`torch.load(weights_only=True)`), numpy arrays and scalars, plain containers, and the pandas Series the food
fork stored as captions. Any other global raises `UnsafePickleError` naming the file and the global.

`read_state_dict` reads model weights from safetensors, torch.save files (weights_only) or TorchScript
archives; `read_torchscript_tensors` reads the tensors of a TorchScript archive (OpenAI's CLIP `.pt` files) as a flat
state dict: module objects become plain attribute records and their TorchScript code is never loaded.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for a global outside the allow-list."""


def _load_storage_bytes(data: bytes):
    # What torch's own `_load_from_bytes` does, but with the weights-only loader.
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError(f"tensor subclass {new_type!r} is not allowed")
    return func(*args)


_TORCH = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
}
_PLAIN = {
    ("collections", "OrderedDict"), ("builtins", "slice"), ("__builtin__", "slice"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("_codecs", "encode"),
}
_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
# What pickling a pandas Series (a DataFrame row) refers to, across pandas 1.x - 3.x.
_PANDAS = {
    ("pandas", "Series"), ("pandas.core.series", "Series"),
    ("pandas.core.internals.managers", "SingleBlockManager"), ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"), ("pandas", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.indexes.numeric", "Int64Index"),
    ("pandas.core.indexes.numeric", "Float64Index"), ("pandas.core.indexes.numeric", "UInt64Index"),
    ("pandas.core.internals.blocks", "new_block"), ("pandas.core.internals.blocks", "Block"),
    ("pandas.core.internals.blocks", "ObjectBlock"), ("pandas.core.internals.blocks", "NumpyBlock"),
    ("pandas.core.internals.blocks", "NumericBlock"), ("pandas.core.internals.blocks", "IntBlock"),
    ("pandas.core.internals.blocks", "FloatBlock"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.internals", "BlockPlacement"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pandas.arrays", "StringArray"), ("pandas.core.arrays.string_", "StringArray"),
    ("pandas", "StringDtype"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.numpy_", "NumpyExtensionArray"), ("pandas.core.arrays.numpy_", "PandasArray"),
}
_DTYPES = {("torch", name) for name in ("float32", "float16", "float64", "bfloat16", "int64", "int32",
                                        "int16", "int8", "uint8", "bool")}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, label: str):
        super().__init__(file)
        self.label = label

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _TORCH:
            return _TORCH[key]
        if key in _PLAIN or key in _NUMPY or key in _PANDAS or key in _DTYPES:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.label}: refused to load global '{module}.{name}': feature pickles may only hold tensors, "
            "numpy arrays, plain containers and pandas Series. If you made this file yourself, re-extract it "
            "with `foodcap extract` (or save it with foodcap.features.save_features).")


def load_pickle(path: str | Path):
    """Unpickle `path` through the allow-list; raises UnsafePickleError for anything else."""
    with open(path, "rb") as f:
        return _AllowListUnpickler(f, str(path)).load()


def loads_pickle(data: bytes, label: str = "<bytes>"):
    return _AllowListUnpickler(io.BytesIO(data), label).load()


# ------------------------------------------------------------------------------------- TorchScript archives

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a TorchScript module: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_strided(flat: torch.Tensor, offset: int, size, stride, *_ignored):
    return flat.as_strided(tuple(size), tuple(stride), offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, label: str):
        super().__init__(file)
        self.archive, self.prefix, self.label = archive, prefix, label

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_strided
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda value: value
        raise UnsafePickleError(f"{self.label}: refused to load global '{module}.{name}' from a TorchScript archive")

    def persistent_load(self, pid):
        _kind, dtype, key, _location, numel = pid[:5]
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return flat[:numel] if flat.numel() >= numel else flat


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensor attributes of a TorchScript archive as {"a.b.weight": tensor}, without loading its code."""
    with zipfile.ZipFile(path) as archive:
        data_pkl = next((n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
        if data_pkl is None:
            raise UnsafePickleError(f"{path}: not a TorchScript archive (no <name>/data.pkl)")
        prefix = data_pkl[: -len("data.pkl")]
        root = _TorchScriptUnpickler(io.BytesIO(archive.read(data_pkl)), archive, prefix, str(path)).load()
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, name: str):
        for key, value in getattr(obj, "attributes", {}).items():
            if isinstance(value, torch.Tensor):
                tensors[name + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{name}{key}.")

    walk(root, "")
    return tensors


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, came from TorchScript) from safetensors, torch.save (weights_only) or a TorchScript archive.

    Training checkpoints wrapping the weights as {"state_dict": ...} are unwrapped. Raises UnsafePickleError
    for anything that is not a mapping of names to tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("constants.pkl") for n in archive.namelist()):
                return read_torchscript_tensors(path), True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsafePickleError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj, False
