import os
import pickle

import numpy as np
import pytest
from test_datasets import py2_pickle  # Python 2 cPickle protocol-2 writer, as the CIFAR files were made

from fixmatch.data.safe_pickle import safe_load_pickle


def _batch(n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batch_round_trips(protocol):
    batch = _batch()
    out = safe_load_pickle(pickle.dumps(batch, protocol=protocol))
    assert set(out) == set(batch)
    assert out[b"labels"] == batch[b"labels"] and out[b"filenames"] == batch[b"filenames"]
    assert out[b"data"].dtype == np.uint8
    np.testing.assert_array_equal(out[b"data"], batch[b"data"])


def test_reads_file_objects_and_numpy_scalars(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"x": np.int64(7), b"f": np.float32(0.5)}, protocol=2))
    with open(path, "rb") as f:
        out = safe_load_pickle(f)
    assert out == {b"x": 7, b"f": 0.5}


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_rejected_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.system"):
        safe_load_pickle(payload)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(V1+1\ntR.",  # protocol 0 GLOBAL + REDUCE
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00base64\x86R.",  # non-latin1 codec
        b"\x80\x02ccopyreg\n_reconstructor\n.",
    ],
)
def test_other_globals_are_rejected(payload):
    with pytest.raises(pickle.UnpicklingError):
        safe_load_pickle(payload)


class _ObjectPointerArray:
    """Reduces to numpy.ndarray((1,), dtype('O'), buffer): an array whose one element is a pointer read from the
    file's bytes. numpy itself would build it, and touching the element would crash the process."""

    def __reduce__(self):
        return np.ndarray, ((1,), np.dtype("O"), b"\x41" * 8)


def test_arrays_of_pointers_made_from_file_bytes_are_refused():
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": _ObjectPointerArray()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="not a valid pickle|refusing"):
        safe_load_pickle(payload)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("value", [np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("a", "u1"), ("b", "O")]),
                                   np.zeros(2, dtype=[("a", "u1"), ("b", "f4")])],
                         ids=["object", "structured-with-object", "structured"])
def test_object_and_structured_dtypes_are_refused(protocol, value):
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load_pickle(pickle.dumps({b"data": value}, protocol=protocol))


def test_build_cannot_set_attributes_on_the_allowed_globals():
    # GLOBAL numpy._core.numeric._frombuffer, then BUILD with (None, {'__defaults__': ()}): with the real function
    # in hand this would break every later numpy unpickle in the process.
    payload = (b"\x80\x02cnumpy._core.numeric\n_frombuffer\n"
               b"N}X\x0c\x00\x00\x00__defaults__)s\x86b0}.")
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load_pickle(payload)
    batch = _batch()
    np.testing.assert_array_equal(safe_load_pickle(pickle.dumps(batch, protocol=5))[b"data"], batch[b"data"])


class _ShortArray:
    """Reduces the way numpy arrays do, with 6 bytes of data for a shape of 7."""

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(7, np.uint8))[:2] + ((1, (7,), np.dtype("u1"), False, bytes(6)),)


def test_array_bytes_must_fill_the_shape_exactly():
    with pytest.raises(pickle.UnpicklingError, match=r"shape \(7,\) and dtype uint8 in 6 bytes"):
        safe_load_pickle(pickle.dumps(_ShortArray(), protocol=2))


@pytest.mark.parametrize("payload", [
    b"\x80\x05\x96\x00\x00\x00\x00\xd4\x00\x00\x00.",  # BYTEARRAY8 claiming 912 GB in a 12-byte file
    pickle.dumps(_batch(), protocol=2)[:-40],  # truncated
    b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",  # lists nested 100,000 deep
], ids=["huge-length", "truncated", "deep"])
def test_corrupt_pickles_are_one_unpickling_error(payload):
    with pytest.raises(pickle.UnpicklingError):
        safe_load_pickle(payload)


@pytest.mark.parametrize("protocol", [2, 5])
def test_plain_dtypes_orders_and_shapes_round_trip(protocol):
    values = {b"be": np.arange(5, dtype=">i8"), b"f": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
              b"fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
              b"scalar0d": np.array(3.5), b"str": np.array(["ab", "c"]), b"bool": np.array([True, False]),
              b"empty": np.zeros((0, 3), np.uint8), b"shared": [np.arange(2)] * 2}
    out = safe_load_pickle(pickle.dumps(values, protocol=protocol))
    for key, value in values.items():
        if key == b"shared":
            assert out[key][0] is out[key][1]
            continue
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key], value)
        assert out[key].flags.writeable


def test_python2_cpickle_form_of_the_official_batches_loads():
    # The official batches were written by Python 2's cPickle: byte strings (SHORT_BINSTRING) for the type
    # code, the byte order and the raw pixels, which encoding='bytes' reads as bytes.
    data = np.arange(6, dtype=np.uint8).reshape(2, 3)
    out = safe_load_pickle(py2_pickle({b"data": data, b"labels": [1, 2]}))
    assert out[b"labels"] == [1, 2]
    assert out[b"data"].dtype == np.uint8 and out[b"data"].tolist() == data.tolist()


class _Reduce:
    """Pickles as ``fn(*args)``, then BUILD with ``state`` when one is given: hand-made hostile files."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, whatever module holds it
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_U1 = np.dtype("u1")


@pytest.mark.parametrize("hostile, message", [
    (_Reduce(np.dtype, (5,)), "a dtype code of type int"),
    (_Reduce(np.dtype, ("u1" * 20,)), r"the dtype code 'u1u1"),
    (_Reduce(np.dtype, ("zz",)), r"the dtype code 'zz'"),
    (np.zeros(2, "M8[s]"), "the dtype 'M8'"),
    (_Reduce(np.dtype, ("u1",), (3,)), "a malformed dtype state"),
    (_Reduce(np.dtype, ("u1",), (3, "x", None, None, None, -1, -1, 0)), "the byte order 'x'"),
    (_Reduce(np.dtype, ("V2",), (3, "|", (_U1, (2,)), None, None, 2, 1, 0)), "a structured or sub-array dtype"),
    (_Reduce(_FROMBUFFER, (b"\x00", "u1", (1,), "C")), "an array whose dtype is not a numpy.dtype"),
    (_Reduce(_FROMBUFFER, (b"\x00", _U1, (-1,), "C")), r"the array shape \(-1,\)"),
    (_Reduce(_FROMBUFFER, (b"\x00", _U1, [1], "C")), r"the array shape \[1\]"),
    (_Reduce(_FROMBUFFER, ("ab", _U1, (2,), "C")), "array data of type str"),
    (_Reduce(_FROMBUFFER, (b"\x00", _U1, (1,), "K")), "the memory order 'K'"),
    (_Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (1,))), "a malformed array state"),
    (_Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b")), "an array that the file never filled"),
    (_Reduce(_RECONSTRUCT, (np.dtype, (0,), b"b")), "_reconstruct of numpy.dtype"),
    (_Reduce(bytes, (10**12,)), r"bytes\(\) with arguments"),
    ({b"type": np.ndarray}, "numpy.ndarray as a value"),
    ((np.dtype,), "numpy.dtype as a value"),
], ids=["code-not-text", "code-too-long", "unknown-code", "datetime", "dtype-state-short", "byte-order",
        "sub-array", "dtype-not-dtype", "negative-shape", "shape-not-tuple", "data-not-bytes", "memory-order",
        "array-state-short", "array-never-built", "reconstruct-other-class", "bytes-allocation", "class-as-value",
        "callable-as-value"])
def test_each_hostile_construction_is_refused_by_name(hostile, message):
    with pytest.raises(pickle.UnpicklingError, match=message) as caught:
        safe_load_pickle(pickle.dumps(hostile, protocol=2))
    assert "\n" not in str(caught.value)


def test_arrays_inside_tuples_and_sets_become_numpy_objects():
    # Protocol 4 has opcodes for sets; protocol 2 would name builtins.frozenset, which is refused.
    out = safe_load_pickle(pickle.dumps({b"t": (np.arange(3, dtype=np.int16), 1), b"s": frozenset({np.int64(4)})},
                                        protocol=4))
    assert out[b"t"][0].dtype == np.int16 and out[b"t"][0].tolist() == [0, 1, 2] and out[b"t"][1] == 1
    assert out[b"s"] == frozenset({4}) and type(next(iter(out[b"s"]))) is np.int64
