"""safetensors codec: exact round trips, and refusal of anything else (pickle above all)."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import pytest
import torch

from stream_learner.checkpoint import CheckpointError, decode_tensors, encode_tensors, sha256_hex
from stream_learner.checkpoint.codec import read_header

from .conftest import assert_bit_identical


def test_round_trip_dtypes_shapes_and_metadata() -> None:
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(5, dtype=torch.float64),
        "i64": torch.tensor([-(2**63), 0, 2**63 - 1], dtype=torch.int64),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).to(torch.float16),
        "bool": torch.tensor([True, False]),
        "u8": torch.arange(256, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "specials": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]),
    }
    metadata = {"arch": "mlp", "classes": '["churn","stay"]', "unicode": "prédiction ✓"}
    data = encode_tensors(tensors, metadata)
    decoded, meta = decode_tensors(data)
    assert_bit_identical(tensors, decoded)
    assert meta == metadata
    assert decode_tensors(encode_tensors(tensors))[1] == {}


def test_views_non_contiguous_and_tied_tensors_are_stored_whole() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1], "base": base, "tied": base}
    decoded, _ = decode_tensors(encode_tensors(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor), name
    assert base.is_contiguous() and base.t().stride() == (1, 4)  # inputs left untouched


def test_decoded_tensors_are_independent_and_writable() -> None:
    decoded, _ = decode_tensors(encode_tensors({"w": torch.zeros(3)}))
    decoded["w"].add_(1)
    assert decoded["w"].tolist() == [1.0, 1.0, 1.0]


def test_bad_metadata_and_non_tensors_are_refused() -> None:
    with pytest.raises(CheckpointError, match="str to str"):
        encode_tensors({"w": torch.zeros(1)}, {"n": 3})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match=r"torch\.Tensor"):
        encode_tensors({"w": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="dense"):
        encode_tensors({"w": torch.eye(3).to_sparse()})


class _Canary:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_a_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    payload_file = tmp_path / "model.pkl"
    payload_file.write_bytes(pickle.dumps({"weight": _Canary(canary)}))
    with pytest.raises(CheckpointError, match="not safetensors"):
        decode_tensors(payload_file.read_bytes())
    assert not canary.exists()

    # The same kind of payload is live: unpickling it does create its canary.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Canary(control)))
    assert control.exists()


def test_a_torch_save_file_is_refused_and_never_executed(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": _Canary(canary)}, buf)
    with pytest.raises(CheckpointError, match="not safetensors"):
        decode_tensors(buf.getvalue())
    assert not canary.exists()


def _framed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter than the 8-byte"),
        (b"\x05\x00\x00", "shorter than the 8-byte"),
        (struct.pack("<Q", 10**12) + b"{}", "impossible"),
        (struct.pack("<Q", 4) + b"[1] ", "does not start with"),
        (struct.pack("<Q", 4) + b"{oo}", "not JSON"),
        (struct.pack("<Q", 2) + b"{}" + b"trailing", "invalid safetensors"),
        (_framed(b'{"__metadata__":{"k":1}}'), "object of strings"),
        (_framed(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}') + b"\0" * 8, "invalid safetensors"),
    ],
    ids=["empty", "short", "huge-header", "not-object", "bad-json", "trailing", "bad-metadata", "truncated"],
)
def test_malformed_input_is_refused_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        decode_tensors(data)


def test_read_header_and_digest() -> None:
    data = encode_tensors({"w": torch.zeros(2, 3)}, {"k": "v"})
    header = read_header(data)
    assert header["w"]["shape"] == [2, 3] and header["__metadata__"] == {"k": "v"}
    assert sha256_hex(data) == sha256_hex(bytearray(data)) and len(sha256_hex(data)) == 64
