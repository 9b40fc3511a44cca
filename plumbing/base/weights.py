"""Model weights on disk: the safetensors format, read and written directly, and Hugging Face
model directories (one file, sharded files with an index, or PyTorch .bin files).

safetensors is simple enough to need no package. A file is three parts:

    ┌────────────┬─────────────────────────────────┬──────────────────────────────────────────┐
    │ N: u64, LE │ header: N bytes of UTF-8 JSON,  │ data: the tensors' raw little-endian     │
    │ (8 bytes)  │ maybe padded with spaces        │ bytes, row-major, back to back           │
    └────────────┴─────────────────────────────────┴──────────────────────────────────────────┘
    header = {"model.norm.weight": {"dtype": "F32", "shape": [4096], "data_offsets": [0, 16384]},
              ...,
              "__metadata__": {"format": "pt"}}      (optional, str -> str)
    data_offsets = [begin, end) in bytes, counted from the start of the data section.

Files written here also carry, in "__metadata__", "sha256": a JSON object of tensor name -> SHA-256
of its bytes; load_safetensors verifies it when present, so a flipped byte is an error, not a weight.

Every number in the header comes from the file, so each is checked before it is used: a truncated
or malformed file is a CheckpointError naming the file, never a crash or a garbage tensor.
"""

import hashlib
import json
import mmap
import os
import re
import struct
from pathlib import Path

import torch

from plumbing.base import files
from plumbing.base.checks import check_regular_file
from plumbing.base.errors import BadInput

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors package enforces
CHECKSUMS = "sha256"  # the "__metadata__" key of the per-tensor checksums

# The weight files of a Hugging Face model directory, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(BadInput):
    """A weight file or model directory that cannot be read; the message names it."""


# ── writing ──────────────────────────────────────────────────────────────────────────────────

def save_safetensors(tensors: dict, path, metadata: dict | None = None, checksums: bool = True) -> None:
    """Write `tensors` (name -> Tensor, any device) to a safetensors file at `path`, with the
    SHA-256 of each tensor's bytes in the metadata (unless checksums=False).

    Atomic: the bytes go to a temporary file in the same folder, which replaces `path` only once
    it is complete and on disk, so a failed save leaves any previous file untouched. Tensors that
    share storage (tied weights) are written as separate copies."""
    path = Path(path)
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{path}: tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
            raise TypeError(f"{path}: {name!r} must be a dense tensor with data, got {_describe(t)}")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    if "__metadata__" in tensors:
        raise CheckpointError(f"{path}: '__metadata__' is reserved for the header and cannot name a tensor")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"{path}: safetensors metadata must map str to str, got {metadata!r}")

    # The data section holds the widest dtypes first: every size is a multiple of its itemsize and the
    # data starts 8-byte aligned, so each tensor lands aligned for its dtype and readers can map it
    # without a copy. The header keeps the caller's order.
    offsets, end = {}, 0
    for name in sorted(tensors, key=lambda n: -tensors[n].element_size()):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        offsets[name], end = (end, end + nbytes), end + nbytes
    if checksums:
        metadata = {**(metadata or {}), CHECKSUMS: json.dumps({n: tensor_sha256(t) for n, t in tensors.items()})}
    header = {"__metadata__": dict(metadata)} if metadata else {}
    for name, t in tensors.items():
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": list(offsets[name])}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # spaces, so that the data section starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in offsets:
            f.write(_bytes_of(tensors[name]))
    files.write_file(path, write)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t`, without copying it when it is already a contiguous CPU tensor."""
    t = t.detach().cpu().contiguous().reshape(-1)  # reshape: view(uint8) needs at least one dim
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes, as a hex string: the integrity check of saved tensors."""
    return hashlib.sha256(_bytes_of(t)).hexdigest()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.layout} tensor on {value.device}"
    return type(value).__name__


# ── reading ──────────────────────────────────────────────────────────────────────────────────

def _read_header(path: Path, f) -> tuple[dict, dict, int]:
    """Read and check the header of the open file `f`.
    Returns ({name: (dtype, shape, begin, end)}, metadata, where the data section starts)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{path}: only {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                              f"(not a safetensors file?)")
    if n > size - 8:
        raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file "
                              f"(truncated, or not a safetensors file?)")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{path}: header names {sorted(k for k in set(keys) if keys.count(k) > 1)} twice")
        return dict(pairs)

    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting: RecursionError
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map str to str, got {metadata!r}")

    data_bytes, entries = size - 8 - n, {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry {info!r} is not an object")
        dtype, shape, offsets = DTYPES.get(info.get("dtype")), info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {info.get('dtype')!r}; known: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair [begin, end] "
                                  f"with 0 <= begin <= end")
        if offsets[1] > data_bytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} run past the {data_bytes} bytes of data "
                                  f"(truncated file?)")
        needed = dtype.itemsize
        for d in shape:
            needed *= d
        if offsets[1] - offsets[0] != needed:
            raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                                  f"but shape {shape} of {info['dtype']} needs {needed}")
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])

    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return entries, metadata, 8 + n


def _check_rows(path: Path, name: str, shape: tuple, out: torch.Tensor, start: int) -> None:
    """`out` must have tensor `name`'s shape, or be its rows [start, start + len(out))."""
    if out.dim() == 0 or len(shape) == 0:
        fits = tuple(out.shape) == tuple(shape) and start == 0
    else:
        fits = tuple(out.shape[1:]) == tuple(shape[1:]) and 0 <= start and start + out.shape[0] <= shape[0]
    if not fits:
        rows = f" from row {start}" if start else ""
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(shape)}, but the destination has "
                              f"shape {tuple(out.shape)}{rows}")


class SafetensorsFile:
    """A safetensors file opened lazily: the header is read and checked at once; the data is
    memory-mapped and read one tensor at a time. Use as a context manager, or call close()."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():  # opening a FIFO would wait forever
            check_regular_file(self.path, CheckpointError)
        try:
            with open(self.path, "rb") as f:
                self._entries, self.metadata, self._data_start = _read_header(self.path, f)
                # A private (copy-on-write) mapping: writable, as torch.frombuffer wants, yet never
                # written back to the file. The mapping keeps its own handle, so the file can close.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror or e})") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def shape(self, name) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name) -> torch.dtype:
        return self._entry(name)[0]

    def _entry(self, name):
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return self._entries[name]

    def _view(self, name, start: int = 0, rows: int | None = None) -> torch.Tensor:
        """The tensor's bytes in the mapping, without a copy (valid until close()): all of it, or its
        rows [start, start + rows)."""
        dtype, shape, begin, end = self._entry(name)
        if rows is not None:  # the bytes of those rows alone
            row = (end - begin) // max(shape[0], 1)
            begin, end, shape = begin + start * row, begin + (start + rows) * row, (rows, *shape[1:])
        if end == begin:  # frombuffer refuses zero bytes
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        if (self._data_start + begin) % dtype.itemsize:
            # Misaligned for its dtype (writers other than ours need not align): torch's kernels
            # assume aligned elements, so give them an aligned copy.
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def copy_into(self, name, out: torch.Tensor, start: int = 0) -> None:
        """Copy tensor `name`, or its rows [start, start + len(out)) (one rank's shard), into `out` (any
        dtype, any device), then release the pages read, so that loading tensor by tensor holds about one
        copy of the weights (of this rank's rows, when sharded)."""
        _check_rows(self.path, name, self.shape(name), out, start)
        with torch.no_grad():
            out.copy_(self._view(name, start, out.shape[0]) if out.dim() else self._view(name))
        dtype, shape, begin, end = self._entries[name]
        if out.dim():  # the bytes of the rows copied
            row = (end - begin) // max(shape[0], 1)
            begin, end = begin + start * row, begin + (start + out.shape[0]) * row
        if end > begin and hasattr(mmap, "MADV_DONTNEED"):
            # Pages of a private mapping that were only read are the file's page-cache pages:
            # dropping them from this process costs a re-read at worst, and nothing was written.
            first = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, first, self._data_start + end - first)

    def get(self, name, device="cpu") -> torch.Tensor:
        """An independent copy of tensor `name`."""
        out = torch.empty(self.shape(name), dtype=self.dtype(name), device=device)
        self.copy_into(name, out)
        return out

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view from _view() is still alive (say, in a traceback): the mapping
            pass             # is then freed with the last reference to it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_safetensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as independent copies on `device`, each checked against
    its checksum when the file carries them (see save_safetensors)."""
    with SafetensorsFile(path) as f:
        expected = _checksums(f.path, f.metadata)
        tensors = {}
        for name in f.keys():
            tensors[name] = f.get(name, device)
            if expected is not None and expected.get(name) != tensor_sha256(tensors[name]):
                raise CheckpointError(f"{f.path}: tensor {name!r} does not match its sha256 checksum "
                                      f"(the file is corrupted)")
        return tensors


def _checksums(path: Path, metadata: dict) -> dict | None:
    """The {name: sha256} of a file's metadata, None if it has none."""
    if CHECKSUMS not in metadata:
        return None
    try:
        sums = json.loads(metadata[CHECKSUMS])
    except (json.JSONDecodeError, RecursionError):
        sums = None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path}: __metadata__ {CHECKSUMS!r} is not a JSON object of tensor name -> checksum")
    return sums


def read_safetensors_metadata(path) -> dict[str, str]:
    """The header's "__metadata__" (empty if absent), without touching the tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_header(path, f)[1]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None


# ── Hugging Face model directories ─────────────────────────────────────────────────────────────

def find_weight_files(directory) -> list[Path]:
    """The weight files of a Hugging Face model directory: a single file, or the shards its
    index lists (each checked to exist), looking for WEIGHT_FILES in that order."""
    directory = Path(directory)
    looked_for = f"looked for {', '.join(WEIGHT_FILES)}"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory ({looked_for})")
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = _read_index(path)
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} lists shard(s) that do not exist in {directory}: {', '.join(missing)}")
        return [directory / s for s in shards]
    raise CheckpointError(f"{directory}: no weight files ({looked_for})")


def _read_index(path: Path) -> list[str]:
    """The shard file names of an index file ({"weight_map": {tensor name: shard file name}})."""
    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        twice = sorted({k for k in names if names.count(k) > 1})
        if twice:
            raise CheckpointError(f"{path}: names {twice[0]!r} twice")
        return dict(pairs)
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable index file ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: needs a non-empty 'weight_map' object of tensor name -> shard file")
    shards = sorted(set(weight_map.values()), key=str)
    for s in shards:
        # Shards live beside the index; a path elsewhere is a corrupt (or hostile) index.
        if not isinstance(s, str) or Path(s).name != s or s in ("", ".", ".."):
            raise CheckpointError(f"{path}: weight_map names {s!r}, which is not a file name in the same folder")
    return shards


class _BinFile:
    """A PyTorch .bin state dict: unpickled without running code (weights_only), memory-mapped
    where the file's format allows it (the zip format of torch >= 1.6). Pages read stay resident
    until the file is closed, so sharded .bin checkpoints peak about one shard above safetensors."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, pre-zip format
        except Exception as e:  # the unpickler raises many types; all mean "not a loadable weights file"
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which loads only "
                                  f"tensors and plain containers: {load_refusal(e)}") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(f"{path}: not a state dict (a dict of str -> tensor)")
        self.tensors = state

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name) -> torch.dtype:
        return self.tensors[name].dtype

    def copy_into(self, name, out: torch.Tensor, start: int = 0) -> None:
        _check_rows(self.path, name, self.shape(name), out, start)
        with torch.no_grad():
            out.copy_(self.tensors[name][start:start + out.shape[0]] if out.dim() else self.tensors[name])

    def close(self) -> None:
        self.tensors = {}


def load_refusal(e: Exception) -> str:
    """What a torch.load error says is wrong, on one line, without the advice around it (to load the
    file with weights_only=False, or to allow its globals: neither is for untrusted files)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
        reason = re.split(r" was not an allowed global|\. Please|Check the documentation", reason)[0]
        return f"WeightsUnpickler error: {reason.strip()}"
    if isinstance(e, EOFError):
        return "the file ends too soon"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(e).__name__


class WeightReader:
    """All tensors of a Hugging Face model directory, over all its shards.

    .shapes: {checkpoint name: shape}, e.g. "model.layers.0.self_attn.q_proj.weight" -> (4096, 4096)
    .dtypes: {checkpoint name: dtype as stored}
    copy_into(name, out, start=0): fill `out` (any dtype/device) from the file holding `name`: the whole
        tensor, or its rows [start, start + len(out)) (a shard, see parallel.py)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.files, self.shapes, self.dtypes, self._owner = [], {}, {}, {}
        try:
            for path in find_weight_files(self.directory):
                f = SafetensorsFile(path) if path.suffix == ".safetensors" else _BinFile(path)
                self.files.append(f)
                for name in f.keys():
                    if name in self._owner:
                        raise CheckpointError(f"tensor {name!r} is in both {self._owner[name].path} and {path}")
                    self._owner[name], self.shapes[name], self.dtypes[name] = f, f.shape(name), f.dtype(name)
        except BaseException:
            self.close()
            raise

    def copy_into(self, name, out: torch.Tensor, start: int = 0) -> None:
        """Copy, then check: a NaN or infinity in the base would make every output meaningless."""
        self._owner[self._known(name)].copy_into(name, out, start)
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise CheckpointError(f"{self.path_of(name)}: tensor {name!r} holds NaN or infinity; a base "
                                  f"model's weights must be finite")

    def path_of(self, name) -> Path:
        """The file that holds tensor `name`."""
        return self._owner[self._known(name)].path

    def _known(self, name):
        if name not in self._owner:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r} in its weight files")
        return name

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_weights(directory) -> WeightReader:
    """Open the weights of a Hugging Face model directory; see WeightReader."""
    return WeightReader(directory)


def checkpoint_names(ours: dict, reader, path, tied: bool) -> list[tuple[str, str]]:
    """(our name, the checkpoint's name) of every tensor to load, largest first; every one checked first.

    ours: our state_dict (its tensors may be on the meta device: only names and shapes are read).
    Every parameter must come from the checkpoint: a missing, unexpected, wrongly shaped or integer
    tensor is an error naming it, before anything is copied, never a partial load."""
    # Our name -> the checkpoint's name: the whole key map. RoPE frequencies, which some
    # older checkpoints store, are derived, not loaded.
    file_name = {}
    for name in reader.shapes:
        ours_name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if ours_name in file_name:  # "model.x" and "x": which one is the weight?
            raise CheckpointError(f"{path}: tensors {file_name[ours_name]!r} and {name!r} are two names for "
                                  f"one weight ({ours_name!r})")
        file_name[ours_name] = name
    # A tied lm_head is embed_tokens itself; a copy in the file is redundant.
    needed = [n for n in ours if not (tied and n == "lm_head.weight")]
    missing = [n if n.startswith("lm_head.") else "model." + n for n in needed if n not in file_name]
    unexpected = [file_name[n] for n in file_name if n not in ours]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match config.json; missing tensors: "
                              f"{_names(missing)}; unexpected tensors: {_names(unexpected)}")
    wrong = [f"{file_name[n]}: checkpoint {tuple(reader.shapes[file_name[n]])} vs config "
             f"{tuple(ours[n].shape)}" for n in needed if tuple(reader.shapes[file_name[n]]) != tuple(ours[n].shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match config.json: " + "; ".join(wrong))
    for n in needed:  # copy_ would turn integers into float weights without a word
        if not reader.dtypes[file_name[n]].is_floating_point:
            raise CheckpointError(f"{reader.path_of(file_name[n])}: tensor {file_name[n]!r} has dtype "
                                  f"{reader.dtypes[file_name[n]]}, but a floating-point weight belongs there")
    # Largest first: while a tensor is copied its pages in the file are resident too, so memory
    # peaks at the weights loaded so far plus the tensor being read. Starting with the embeddings
    # keeps that peak at about one copy of the weights.
    return [(n, file_name[n]) for n in sorted(needed, key=lambda n: ours[n].numel(), reverse=True)]


def _names(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
