"""Reading and writing model weights: the safetensors format, and Hugging Face model directories.

safetensors is simple enough to read and write directly, which keeps the `safetensors` package
out of the runtime dependencies. A file is:

    ┌──────────┬──────────────────────────────────────┬──────────────────────────────────────┐
    │ N: u64 LE│ header: N bytes of UTF-8 JSON         │ data: raw little-endian tensor bytes  │
    └──────────┴──────────────────────────────────────┴──────────────────────────────────────┘
    header = {"model.norm.weight": {"dtype": "F32", "shape": [4096], "data_offsets": [begin, end]},
              ..., "__metadata__": {"format": "pt"}}       (offsets are relative to the data start)

Every number in the header comes from the file, so every number is checked before it is used:
a truncated or malformed file is a CheckpointError naming the file, never a garbage tensor.
"""

import json
import mmap
import os
import struct
from pathlib import Path

import torch

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the limit the reference implementation enforces

# The files of a Hugging Face model directory, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; the message names it."""


# ── writing ──────────────────────────────────────────────────────────────────────────────────

def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write tensors to a safetensors file, atomically: a temporary file beside it, then a rename,
    so an interrupted save leaves the previous file intact rather than half a new one."""
    path = Path(path)
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: save_safetensors needs str -> Tensor, got {name!r} -> {type(t).__name__}")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"{path}: safetensors metadata must map str to str")

    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so that the data start, and so each F64/I64, is 8-byte aligned

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in tensors.values():
                if t.numel():  # bytes of the contiguous CPU tensor, without another copy
                    f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ── reading ──────────────────────────────────────────────────────────────────────────────────

def _parse_header(path: Path, f) -> tuple[dict, dict, int]:
    """Read and check the header: -> ({name: (dtype, shape, begin, end)}, metadata, data start)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER, size - 8):
        raise CheckpointError(f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_len, entries = size - 8 - n, {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            raise CheckpointError(f"{where}: unknown or missing dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} lie outside the {data_len} data bytes "
                                  f"(truncated file?)")
        dtype = DTYPES[info["dtype"]]
        expected = dtype.itemsize
        for d in shape:
            expected *= d
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} of "
                                  f"{info['dtype']}, which needs {expected}")
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return entries, metadata, 8 + n


class SafetensorsFile:
    """A safetensors file opened lazily: the header is read and checked, the data is memory-mapped
    and read one tensor at a time. Use as a context manager, or call close()."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self.entries, self.metadata, self._start = _parse_header(self.path, self._file)
            # ACCESS_COPY: a private mapping, writable for torch.frombuffer, never written back.
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        except BaseException:
            self._file.close()
            raise

    def keys(self):
        return list(self.entries)

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def dtype(self, name) -> torch.dtype:
        return self.entries[name][0]

    def _view(self, name) -> torch.Tensor:
        """The tensor's bytes in the mapping, without a copy (valid until close)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._start + begin)
        if (self._start + begin) % dtype.itemsize:  # misaligned for its dtype: view() needs a copy
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def get(self, name) -> torch.Tensor:
        """An independent copy of one tensor."""
        return self._view(name).clone()

    def copy_into(self, name, out: torch.Tensor) -> None:
        """Copy one tensor into `out` (same shape; any dtype, any device), then drop the pages it read."""
        if tuple(out.shape) != self.shape(name):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {self.shape(name)}, "
                                  f"expected {tuple(out.shape)}")
        with torch.no_grad():
            out.copy_(self._view(name))
        _, _, begin, end = self.entries[name]
        if end > begin and hasattr(mmap, "MADV_DONTNEED"):
            # The mapping is private and never written, so dropping pages just lets the kernel reclaim
            # them: loading a model tensor by tensor then holds about one copy of it in memory.
            first = (self._start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, first, self._start + end - first)

    def close(self):
        try:
            self._map.close()
        except BufferError:  # a tensor from _view is still alive; the mapping closes when it dies
            pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_safetensors(path, device="cpu") -> dict:
    """Every tensor of a safetensors file, as independent copies on `device`."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name).to(device) for name in f.keys()}


def read_safetensors_metadata(path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _parse_header(path, f)[1]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None


# ── Hugging Face model directories ─────────────────────────────────────────────────────────────

def find_weight_files(directory) -> list[Path]:
    """The weight files of an HF model directory: one file, or the shards its index lists."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid index file (needs a 'weight_map' object): {e}") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} lists shard(s) that do not exist: {', '.join(missing)}")
        return [directory / s for s in shards]
    raise CheckpointError(f"{directory}: no weight files; looked for {', '.join(WEIGHT_FILES)}")


class _BinFile:
    """A PyTorch .bin state dict, loaded without running pickled code (weights_only) and mmapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, pre-zip format
        except Exception as e:  # the unpickler raises many types; all mean "not a loadable weights file"
            raise CheckpointError(f"{path}: cannot be loaded as a weights-only state dict: "
                                  f"{str(e).splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: is not a state dict of tensors")
        self.tensors = state

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def copy_into(self, name, out):
        if tuple(out.shape) != self.shape(name):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {self.shape(name)}, "
                                  f"expected {tuple(out.shape)}")
        with torch.no_grad():
            out.copy_(self.tensors[name])

    def close(self):
        self.tensors = {}


class WeightReader:
    """All tensors of an HF model directory, over all its shards: .shapes, copy_into(name, out)."""

    def __init__(self, directory):
        self.files, self._owner, self.shapes = [], {}, {}
        try:
            for path in find_weight_files(directory):
                f = SafetensorsFile(path) if path.suffix == ".safetensors" else _BinFile(path)
                self.files.append(f)
                for name in f.keys():
                    if name in self._owner:
                        raise CheckpointError(f"tensor {name!r} is in both {self._owner[name].path} and {path}")
                    self._owner[name], self.shapes[name] = f, f.shape(name)
        except BaseException:
            self.close()
            raise

    def copy_into(self, name, out):
        self._owner[name].copy_into(name, out)

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_weights(directory) -> WeightReader:
    return WeightReader(directory)
