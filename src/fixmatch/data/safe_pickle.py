"""A restricted unpickler for CIFAR-format batch files.

Unpickling runs arbitrary callables named in the file, so a tampered data set could execute code. CIFAR
batches need only numpy's array, dtype and scalar reconstruction (plus ``_codecs.encode`` and ``bytes()``,
which Python 3 uses for bytes in protocol-2 pickles, restricted here to latin-1 and to b""), so every
other global is refused before anything is called.

Even numpy's own constructors are not handed to the file: ``numpy.ndarray`` and ``numpy.dtype`` called with
crafted arguments can make an array of Python-object pointers read from the file's bytes (a crash, or
worse), and BUILD could set attributes on any function the file can name. So the names the file may use
resolve to stand-ins (``_Sealed``) on which nothing can be set: ``numpy.dtype`` records a type code that
must name a plain numeric or fixed-size string type; ``_reconstruct`` / ``_frombuffer`` / ``scalar``
record arrays and scalars whose bytes must fill exactly that type and shape. Real numpy objects are made
only after the whole file is read, with ``np.frombuffer`` from checked bytes, and replace the stand-ins.
No library offers this: ``pickle`` has ``find_class`` only, and numpy's loaders trust the file.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["safe_load_pickle", "RestrictedUnpickler"]

_KINDS = "biufcSU"  # bool, integers, floats, complex, bytes and str: dtypes that hold no Python objects
_MAX_CODE = 32  # longer dtype codes are structured types, which are refused anyway


def _refuse(why: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refusing {why}: only numpy arrays of plain numbers or strings are allowed "
                                  f"in data set pickles")


class _Sealed:
    """What a pickle can get hold of: BUILD can neither set attributes on it nor give it a state."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise _refuse(f"to set attribute {name!r} of {self!r}")

    def __setstate__(self, state: Any) -> None:
        raise _refuse(f"a BUILD on {self!r}")


class _Global(_Sealed):
    """A callable the file may name, e.g. ``numpy.dtype``: calls ``fn`` with the file's arguments."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn: Any) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return self._name


class _Token(_Sealed):
    """A name the file may load but not call (``numpy.ndarray``, the class argument of ``_reconstruct``)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __repr__(self) -> str:
        return self._name


_NDARRAY = _Token("numpy.ndarray")


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise _refuse(f"a {what} of type {type(value).__name__}")
    return value


class _DtypeSpec(_Sealed):
    """Stands for ``numpy.dtype(code)``; its BUILD state may set the byte order and nothing else."""

    __slots__ = ("code", "byteorder", "built")

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        code = _text(code, "dtype code")
        if len(code) > _MAX_CODE:
            raise _refuse(f"the dtype code {code[:_MAX_CODE]!r}...")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "byteorder", "=")
        object.__setattr__(self, "built", False)

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags).
        if self.built or not isinstance(state, tuple) or len(state) < 5:
            raise _refuse("a malformed dtype state")
        order = _text(state[1], "byte order")
        if order not in ("<", ">", "|", "="):
            raise _refuse(f"the byte order {order!r}")
        if any(part is not None for part in state[2:5]):
            raise _refuse("a structured or sub-array dtype")
        object.__setattr__(self, "byteorder", order)
        object.__setattr__(self, "built", True)

    def resolve(self) -> np.dtype:
        try:
            dtype = np.dtype(self.code)
        except (TypeError, ValueError, SyntaxError):
            raise _refuse(f"the dtype code {self.code!r}") from None
        if dtype.kind not in _KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise _refuse(f"the dtype {self.code!r}")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in ("<", ">") else dtype

    def __repr__(self) -> str:
        return f"numpy.dtype({self.code!r})"


def _checked_array(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """The array that ``data`` (raw bytes) holds for this dtype, shape and memory order, or a refusal."""
    if not isinstance(dtype, _DtypeSpec):
        raise _refuse("an array whose dtype is not a numpy.dtype")
    dt = dtype.resolve()
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise _refuse(f"the array shape {shape!r}")
    if not isinstance(data, (bytes, bytearray)):  # object arrays pickle their items as a list
        raise _refuse(f"array data of type {type(data).__name__}")
    order = _text(order, "memory order")
    if order not in ("C", "F"):
        raise _refuse(f"the memory order {order!r}")
    need = math.prod(shape) * dt.itemsize
    if len(data) != need:
        raise _refuse(f"an array of shape {shape} and dtype {dt} in {len(data)} bytes (it needs {need})")
    return np.frombuffer(data, dtype=dt).reshape(shape, order=order).copy()


class _ArraySpec(_Sealed):
    """Stands for an array or scalar; ``value`` is set once, from checked bytes."""

    __slots__ = ("value", "built")

    def __init__(self, value: Any = None, built: bool = False) -> None:
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "built", built)

    def __setstate__(self, state: Any) -> None:
        # ndarray's state after _reconstruct: (version, shape, dtype, is_fortran, raw bytes).
        if self.built or not isinstance(state, tuple) or len(state) != 5:
            raise _refuse("a malformed array state")
        _version, shape, dtype, fortran, data = state
        object.__setattr__(self, "value", _checked_array(data, dtype, shape, "F" if fortran else "C"))
        object.__setattr__(self, "built", True)

    def result(self) -> Any:
        if not self.built:
            raise _refuse("an array that the file never filled")
        return self.value

    def __repr__(self) -> str:
        return "numpy array"


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArraySpec:
    if subtype is not _NDARRAY:
        raise _refuse(f"_reconstruct of {subtype!r}")
    return _ArraySpec()  # filled by the BUILD that follows


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArraySpec:
    return _ArraySpec(_checked_array(buffer, dtype, shape, order), built=True)  # protocol-5 arrays


def _scalar(dtype: Any, data: Any = None) -> _ArraySpec:
    return _ArraySpec(_checked_array(data, dtype, (), "C")[()], built=True)


def _latin1_encode(obj: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    # Stand-in for _codecs.encode that cannot reach arbitrary (possibly custom) codecs.
    if not isinstance(obj, str) or not isinstance(encoding, str) or not isinstance(errors, str) \
            or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1", errors)


def _empty_bytes(*args: Any) -> bytes:
    # Protocol 2 pickles b"" as a call of bytes() without arguments; with one, bytes(n) would allocate n bytes.
    if args:
        raise _refuse("bytes() with arguments")
    return b""


# Objects are mapped by name (not imported by name) so old pickles naming numpy.core still load on numpy 2.
_ALLOWED: dict[tuple[str, str], _Sealed] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _Global("_reconstruct", _reconstruct)
       for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _Global("scalar", _scalar) for core in ("core", "_core")},
    # Protocol-5 array pickles (e.g. a re-saved batch) rebuild via np.frombuffer.
    **{(f"numpy.{core}.numeric", "_frombuffer"): _Global("_frombuffer", _frombuffer) for core in ("core", "_core")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global("numpy.dtype", _DtypeSpec),
    ("_codecs", "encode"): _Global("_codecs.encode", _latin1_encode),
    **{(builtins, "bytes"): _Global("bytes", _empty_bytes) for builtins in ("builtins", "__builtin__")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals in ``_ALLOWED`` (stand-ins, see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays are allowed in data set pickles"
            ) from None


def _real(obj: Any, seen: set[int]) -> Any:
    """``obj`` with every stand-in replaced by the numpy object it stands for (lists and dicts in place)."""
    if isinstance(obj, _ArraySpec):
        return obj.result()
    if isinstance(obj, _DtypeSpec):
        return obj.resolve()
    if isinstance(obj, _Sealed):
        raise _refuse(f"{obj!r} as a value")
    if isinstance(obj, (list, dict)):
        if id(obj) in seen:  # shared or self-referencing: already done
            return obj
        seen.add(id(obj))
        if isinstance(obj, list):
            obj[:] = [_real(item, seen) for item in obj]
        else:
            items = [(_real(k, seen), _real(v, seen)) for k, v in obj.items()]
            obj.clear()
            obj.update(items)
        return obj
    if isinstance(obj, tuple):
        return tuple(_real(item, seen) for item in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_real(item, seen) for item in obj)
    return obj


def safe_load_pickle(src: bytes | bytearray | memoryview | IO[bytes]) -> object:
    """Unpickle ``src`` (bytes or a binary file object) with ``encoding='bytes'``.

    Raises ``pickle.UnpicklingError`` naming any disallowed global or value, and for any file that is not a
    well-formed pickle (a corrupt length, a truncated stream, nesting too deep); reading errors stay OSError.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    try:
        return _real(RestrictedUnpickler(src, encoding="bytes").load(), set())
    except (pickle.UnpicklingError, OSError):
        raise
    except RecursionError:
        raise pickle.UnpicklingError("not a valid pickle: nested too deeply") from None
    except EOFError:
        raise pickle.UnpicklingError("not a valid pickle: the file ends early") from None
    except Exception as e:  # MemoryError, OverflowError, ...: a corrupt file, whatever the opcode it breaks
        raise pickle.UnpicklingError(f"not a valid pickle ({type(e).__name__}: {e})") from None
