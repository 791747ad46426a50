import os
import pickle

import numpy as np
import pytest

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
