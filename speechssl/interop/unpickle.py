"""Read original fairseq ``.pt`` checkpoints without fairseq, omegaconf or arbitrary code.

A fairseq checkpoint is a ``torch.save`` pickle whose configuration part holds objects of fairseq's
and omegaconf's classes (``argparse.Namespace`` in 2020 checkpoints, omegaconf ``DictConfig`` in
2021+ ones, enums such as ``ChoiceEnum``). ``torch.load(weights_only=True)`` refuses those, and
``weights_only=False`` would run whatever the pickle names. :func:`load_fairseq_checkpoint` instead
unpickles with :class:`RestrictedUnpickler`, which resolves a global only if it is

* plain data or a tensor constructor: ``torch._utils._rebuild_tensor_v2`` and its siblings,
  ``torch.nn.Parameter``, ``torch.Size``, ``torch.device``, torch dtypes, storages (torch's own
  loader maps those), ``collections.OrderedDict`` / ``defaultdict``, ``builtins.set/frozenset/slice/complex``,
  ``_codecs.encode`` (protocol-2 bytes), NumPy array/scalar/dtype reconstruction, ``operator.getitem``
  on stand-in classes only (omegaconf 2.0 pickles ``typing.List[float]`` that way);
* ``argparse.Namespace`` (fairseq's old ``args``), ``pathlib`` paths;
* a name in ``omegaconf``, ``fairseq``, ``fairseq2``, ``typing`` or ``enum``: resolved to an inert
  stand-in class (:class:`StandIn`) that only records the arguments and state the pickle gives it
  and never imports or calls the real class.

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) raises
:class:`UnsafeCheckpointError` naming it. After loading, :func:`to_plain` turns the stand-ins back into
plain data: omegaconf ``DictConfig``/``ListConfig`` into dicts/lists (values of their nodes, ``???``
for missing values, interpolations as their ``${...}`` string), enums into their values, other
stand-ins into ``{"__class__": "module.Name", "args": [...], "state": ...}``, ``Namespace`` into a dict.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pathlib
import pickle
import types
from pathlib import Path
from typing import Any, BinaryIO

import torch

# modules whose classes are rebuilt as inert stand-ins (configuration objects, type references)
STAND_IN_MODULES = ("omegaconf", "fairseq", "fairseq2", "typing", "enum")

_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "Tensor"),
    ("torch._tensor", "Tensor"),
}
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,  # its factory is itself an allowed global
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "range"): range,
    ("argparse", "Namespace"): argparse.Namespace,
    ("pathlib", "Path"): pathlib.Path,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
}
# plain Python types that configuration objects refer to (omegaconf's ref_type / object_type)
_BUILTIN_TYPES = {"int", "float", "str", "bool", "bytes", "dict", "list", "tuple", "object", "NoneType"}
_NUMPY_GLOBALS = {"_reconstruct", "scalar", "ndarray", "dtype"}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy", "numpy.dtypes")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle names a global that could run code; the message names it."""


class StandIn:
    """Inert replacement for a configuration class (omegaconf, fairseq, enum ...): records the
    constructor arguments and the pickled state, nothing else. Subclasses carry the original
    ``module.Name`` in ``qualified_name``."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = list(args), dict(kwargs), None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in {self.qualified_name} args={self.args!r} state={type(self.state).__name__}>"


_STAND_INS: dict[str, type[StandIn]] = {}


def stand_in(module: str, name: str) -> type[StandIn]:
    """The (cached) :class:`StandIn` subclass for ``module.name``."""
    key = f"{module}.{name}"
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name.replace(".", "_"), (StandIn,), {"qualified_name": key, "__module__": __name__})
    return _STAND_INS[key]


def _safe_rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` restricted to plain tensors and Parameters."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeCheckpointError(f"tensor subclass {new_type!r} is not allowed")
    from torch._tensor import _rebuild_from_type_v2

    return _rebuild_from_type_v2(func, new_type, args, state)


def _safe_getitem(obj: Any, key: Any) -> Any:
    """``operator.getitem`` as omegaconf 2.0 pickles typing generics (``getitem(typing.List, float)``):
    only on stand-in classes, giving an inert stand-in instance."""
    if isinstance(obj, type) and issubclass(obj, StandIn):
        return obj(key)
    raise UnsafeCheckpointError(f"operator.getitem on {type(obj).__name__} is not allowed")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals listed in the module docstring."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: C901 (one flat allowlist)
        # protocol-2 pickles (torch.save's) spell Python 3 names the Python 2 way (__builtin__.set ...)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if (module, name) in _TENSOR_GLOBALS:
            return super().find_class(module, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _safe_rebuild_from_type_v2
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "builtins" and name in _BUILTIN_TYPES:
            return _builtin_type(name)
        if module in ("_operator", "operator") and name == "getitem":
            return _safe_getitem
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if module.split(".")[0] in STAND_IN_MODULES:
            return stand_in(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load global '{module}.{name}': a checkpoint may hold only tensors, plain data "
            "and configuration objects. If this is a genuine model checkpoint, load it with the library that "
            "wrote it and save its state_dict with torch.save.")


def _builtin_type(name: str) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool, "bytes": bytes, "dict": dict, "list": list,
            "tuple": tuple, "object": object, "NoneType": type(None)}[name]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``encode(str, 'latin1')``)."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


# A module object for ``torch.load(pickle_module=...)``: torch wraps ``Unpickler`` (adding its storage
# handling) and calls ``load`` for the header records of legacy-format files.
restricted_pickle = types.ModuleType("speechssl_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
restricted_pickle.loads = lambda b, **kw: RestrictedUnpickler(io.BytesIO(b), **kw).load()  # type: ignore[attr-defined]
restricted_pickle.__version__ = pickle.format_version  # type: ignore[attr-defined]


def restricted_load(source: str | Path | BinaryIO) -> Any:
    """``torch.load`` on the CPU through :class:`RestrictedUnpickler` (zip and legacy formats).
    Returns the raw object, stand-ins included (see :func:`to_plain`)."""
    return torch.load(source, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)


# --------------------------------------------------------------------------------------------------
# Stand-ins -> plain data
# --------------------------------------------------------------------------------------------------

_OMEGACONF_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode",
                    "BytesNode", "PathNode", "ValueNode", "InterpolationResultNode")


def to_plain(obj: Any) -> Any:
    """Replace stand-ins, ``Namespace`` and ``OrderedDict`` by dicts/lists/values, recursively.
    Tensors and arrays are returned as they are."""
    if isinstance(obj, StandIn):
        return _stand_in_to_plain(obj)
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


def _stand_in_to_plain(obj: StandIn) -> Any:
    module, _, name = obj.qualified_name.rpartition(".")
    state = obj.state
    if module.startswith("omegaconf") and name in ("DictConfig", "ListConfig"):
        content = state.get("_content") if isinstance(state, dict) else None
        if isinstance(content, dict):
            return {k: to_plain(v) for k, v in content.items()}
        if isinstance(content, (list, tuple)):
            return [to_plain(v) for v in content]
        return content  # None, "???" (missing) or "${...}" (interpolation)
    if module.startswith("omegaconf") and name in _OMEGACONF_NODES:
        return to_plain(state.get("_val")) if isinstance(state, dict) else None
    if isinstance(state, dict) and "_value_" in state:  # an enum pickled by value with its state
        return to_plain(state["_value_"])
    if state is None and len(obj.args) == 1 and not obj.kwargs:  # enums: Class(value)
        return to_plain(obj.args[0])
    return {"__class__": obj.qualified_name, "args": to_plain(obj.args), "state": to_plain(state)}


def load_fairseq_checkpoint(path: str | Path) -> dict[str, Any]:
    """An original fairseq checkpoint -> plain dict (``model`` state dict, ``cfg``/``args`` as dicts).

    Raises :class:`UnsafeCheckpointError` for pickles naming disallowed globals and ValueError when the
    file is not a dict-shaped checkpoint; both name the file.
    """
    try:
        raw = restricted_load(path)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"cannot read {path} as a torch/fairseq checkpoint: {exc}") from None
    data = to_plain(raw)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(data).__name__}")
    return data
