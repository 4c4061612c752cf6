"""TensorBoard event files: written by ldmkit, read back by TensorBoard's own EventAccumulator."""

import struct

import pytest

from ldmkit.training.tensorboard import EventWriter, _masked_crc, crc32c


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # ... and of ones
    assert crc32c(bytes(range(32))) == 0x46DD794E  # ... and incrementing


def test_record_framing(tmp_path):
    with EventWriter(tmp_path) as writer:
        writer.scalar("loss", 0.5, 3)
    data = writer.path.read_bytes()
    records = []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == _masked_crc(data[:8])
        body = data[12 : 12 + length]
        assert struct.unpack("<I", data[12 + length : 16 + length])[0] == _masked_crc(body)
        records.append(body)
        data = data[16 + length :]
    assert len(records) == 2 and b"brain.Event:2" in records[0] and b"loss" in records[1]


def test_scalars_read_back_by_tensorboard(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    written = {
        "train/loss": [(0, 1.25), (1, 0.75), (10, -3.5), (2**40, 1e-8)],
        "train/lr": [(5, 1e-4), (6, 2e-4)],
        "eval/fid ü": [(100, 12.5)],
    }
    with EventWriter(tmp_path / "run") as writer:
        for tag, points in written.items():
            for step, value in points:
                writer.scalar(tag, value, step, wall_time=1_700_000_000.25 + step % 7)
        writer.flush()
    assert writer.path.name.startswith("events.out.tfevents.")
    acc = accumulator.EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(written)
    for tag, points in written.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [s for s, _ in points]
        assert [e.value for e in events] == [pytest.approx(v, rel=1e-6) for _, v in points]
        assert [e.wall_time for e in events] == [1_700_000_000.25 + s % 7 for s, _ in points]
