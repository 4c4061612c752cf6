"""A dependency-free writer of TensorBoard scalar event files.

An event file is a TFRecord stream (the format of tensorflow/core/lib/io/record_writer.cc):
each record is

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

little-endian, where crc32c is the Castagnoli CRC and mask(c) = ((c >> 15 | c << 17) + 0xa282ead8).
Each record's data is a protobuf `Event` (tensorflow/core/util/event.proto), encoded by hand:
the first carries `file_version = "brain.Event:2"`, the rest
`Event{wall_time=1 (double), step=2 (int64), summary=5 {value=1 {tag=1, simple_value=2 (float)}}}`.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli polynomial
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, e.g. crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: key (number << 3 | wire type), then the payload (length-prefixed for 2)."""
    if wire_type == 2:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def _event(wall_time: float, step: int = 0, *, file_version: str | None = None, summary: bytes = b"") -> bytes:
    data = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        data += _field(3, 2, file_version.encode())
    if summary:
        data += _field(5, 2, summary)
    return data


class EventWriter:
    """Append scalars to `logdir/events.out.tfevents.<time>.<hostname>`, readable by TensorBoard."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.logdir / f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "wb")
        self._write(_event(now, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """Record `value` for `tag` at `step` (wall_time: seconds since the epoch, default now)."""
        summary_value = _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
        summary = _field(1, 2, summary_value)
        self._write(_event(time.time() if wall_time is None else wall_time, int(step), summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
