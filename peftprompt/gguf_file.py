"""Read and check the header of a GGUF file (its metadata and tensor table) before anything else loads it.

```py
>>> from peftprompt.gguf_file import read_gguf_header
>>> header = read_gguf_header("SmolLM2-135M-Instruct.Q4_1.gguf")
>>> header.value("general.architecture"), len(header.value("tokenizer.ggml.tokens")), len(header.tensors)
('llama', 49152, 272)
```

`read_gguf_header` walks the header as the GGUF format lays it out (magic ``GGUF``, version, tensor and metadata
counts, the metadata, the tensor table) and checks that every tensor's data lies inside the file, so a file that is
not a GGUF, or a GGUF cut short, is refused with an `InputError` naming it instead of reaching llama.cpp. It reads
nothing of the tensor data. The ``gguf`` package's `GGUFReader` reads the same header, but builds a NumPy view of
every element of every metadata array on the way: about 7 s for the 98 MB SmolLM2 GGUF (its 49,152 tokens and
48,900 merges) on a busy 2-core machine, against a fraction of a second here.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import InputError, InputFileNotFoundError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
"""The fixed-size metadata types and their little-endian `struct` formats."""


@dataclass(frozen=True)
class GGUFField:
    """One metadata entry: its `type`, the type of its elements (`sub_type`, arrays only) and its `value` (a Python
    scalar, a `str`, or a list of them)."""

    type: GGUFValueType
    sub_type: Optional[GGUFValueType]
    value: Any


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table: `name`, `shape` (ggml order: the row length first), `type` and the `offset` of
    its data from the start of the data section, and its size in bytes (`nbytes`)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header holds: its `version`, `fields` (metadata by key), `tensors` (the tensor table, in
    file order) and where the tensor data starts (`data_offset`)."""

    path: Path
    version: int
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensorInfo]
    data_offset: int

    def value(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key`, or `default` when the file has no such key."""
        field = self.fields.get(key)
        return default if field is None else field.value


class _Cursor:
    """Reads little-endian values from a buffer, refusing (with `where`) to read past its end."""

    def __init__(self, buffer, where: Path):
        self.buffer, self.where, self.pos = buffer, where, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buffer):
            raise InputError(f"the GGUF file ends at byte {len(self.buffer):,}, inside its header (truncated?)",
                             file=self.where)
        view = memoryview(self.buffer)[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"a GGUF string at byte {self.pos - len(raw):,} is not UTF-8 ({err.reason})",
                             file=self.where) from err

    def value_type(self) -> GGUFValueType:
        raw = self.scalar("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise InputError(f"unknown GGUF metadata type {raw} at byte {self.pos - 4:,}", file=self.where) from None

    def value(self, kind: GGUFValueType) -> GGUFField:
        if kind in SCALARS:
            return GGUFField(kind, None, self.scalar(SCALARS[kind]))
        if kind == GGUFValueType.STRING:
            return GGUFField(kind, None, self.string())
        sub_type, count = self.value_type(), self.scalar("<Q")
        if sub_type in SCALARS:  # one read for the whole array
            dtype = np.dtype(SCALARS[sub_type])
            items = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
        elif sub_type == GGUFValueType.STRING:
            items = [self.string() for _ in range(count)]
        else:
            items = [self.value(sub_type).value for _ in range(count)]
        return GGUFField(kind, sub_type, items)


def read_gguf_header(path: Union[str, Path]) -> GGUFHeader:
    """The header of the GGUF file `path`, checked: a GGUF magic and version, metadata and a tensor table that end
    inside the file, known tensor types, aligned offsets, and tensor data that ends inside the file.

    Raises:
        InputFileNotFoundError: `path` does not exist.
        InputError: `path` is not a GGUF file, or is cut short or damaged (the message says where), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"GGUF file {path} does not exist", file=path)
    size = path.stat().st_size
    if size < len(MAGIC) + 4 + 16:
        raise InputError(f"not a GGUF file: {size} bytes, fewer than a GGUF header holds", file=path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        if buffer[: len(MAGIC)] != MAGIC:
            raise InputError(f"not a GGUF file: it starts with {bytes(buffer[:4])!r}, not {MAGIC!r}", file=path)
        cursor = _Cursor(buffer, path)
        cursor.take(len(MAGIC))
        version = cursor.scalar("<I")
        if version not in VERSIONS:
            raise InputError(f"GGUF version {version} (or a big-endian file): llama.cpp reads little-endian "
                             f"versions {' and '.join(map(str, VERSIONS))}", file=path)
        n_tensors, n_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
        fields = {}
        for _ in range(n_fields):
            key = cursor.string()
            fields[key] = cursor.value(cursor.value_type())
        raw_tensors = []
        for _ in range(n_tensors):
            name, n_dims = cursor.string(), cursor.scalar("<I")
            if n_dims > MAX_DIMS:
                raise InputError(f"tensor {name!r} has {n_dims} dimensions, more than ggml's {MAX_DIMS}", file=path)
            shape = tuple(cursor.scalar("<Q") for _ in range(n_dims))
            raw_tensors.append((name, shape, cursor.scalar("<I"), cursor.scalar("<Q")))
        header_end = cursor.pos
    alignment = fields.get("general.alignment")
    alignment = int(alignment.value) if alignment is not None else DEFAULT_ALIGNMENT
    if alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"general.alignment is {alignment}, not a power of two", file=path)
    data_offset = -(-header_end // alignment) * alignment
    tensors = [_tensor_info(path, name, shape, kind, offset, alignment) for name, shape, kind, offset in raw_tensors]
    for tensor in tensors:
        end = data_offset + tensor.offset + tensor.nbytes
        if end > size:
            raise InputError(f"the GGUF file is cut short: tensor {tensor.name!r} ends at byte {end:,}, the file at "
                             f"{size:,}", file=path)
    return GGUFHeader(path, version, fields, tensors, data_offset)


def _tensor_info(path: Path, name: str, shape: tuple[int, ...], kind: int, offset: int,
                 alignment: int) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(kind)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise InputError(f"tensor {name!r} has the unknown type {kind}", file=path) from None
    if offset % alignment:
        raise InputError(f"tensor {name!r} starts at offset {offset}, not a multiple of {alignment}", file=path)
    elements = math.prod(shape)
    if shape and shape[0] % block_size:
        raise InputError(f"tensor {name!r}: rows of {shape[0]} values do not fill {qtype.name} blocks of "
                         f"{block_size}", file=path)
    return GGUFTensorInfo(name, shape, qtype, offset, elements // block_size * type_size)


__all__ = ["GGUFField", "GGUFHeader", "GGUFTensorInfo", "read_gguf_header"]
