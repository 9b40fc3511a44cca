"""weights.py against the `safetensors` package (both directions), on malformed files, and on
Hugging Face model directories (single, sharded, .bin)."""

import json
import mmap
import random
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plumbing.base import weights
from conftest import Payload
from plumbing.base.weights import (CHECKSUMS, CheckpointError, SafetensorsFile, find_weight_files, load_safetensors,
                     open_weights, read_safetensors_metadata, save_safetensors, tensor_sha256)


def random_tensor(dtype, shape, seed=0) -> torch.Tensor:
    """Random bits of `dtype` (NaNs and infinities included for floats): the format moves bytes."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def sample() -> dict[str, torch.Tensor]:
    """One tensor per dtype, plus a 0-d and an empty tensor; odd sizes so offsets are not all aligned."""
    tensors = {f"t.{name}": random_tensor(dtype, (3, 5), seed=i)
               for i, (name, dtype) in enumerate(weights.DTYPES.items())}
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 7)
    tensors["bytes"] = random_tensor(torch.uint8, (3,), seed=99)
    return tensors


def assert_same(a: torch.Tensor, b: torch.Tensor):
    """Same dtype, shape and bytes (bitwise, so NaNs compare equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def header_of(path) -> dict:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def raw_file(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file built by hand, so that it can be wrong in any one way."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


# ── both directions against the safetensors package ─────────────────────────────────────────────

def test_files_we_write_are_read_by_the_package(tmp_path):
    tensors = sample()
    base = torch.arange(12.0).reshape(3, 4)
    tensors |= {"tied.a": base, "tied.b": base, "transposed": base.t(), "slice": base[1:, ::2]}
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt", "note": "é ✓"})

    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert set(theirs) == set(tensors)
    for name, t in tensors.items():
        assert_same(theirs[name], t.contiguous())
    with safetensors.safe_open(tmp_path / "ours.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta.pop("sha256")) == {name: tensor_sha256(t) for name, t in tensors.items()}
    assert meta == {"format": "pt", "note": "é ✓"}


def test_files_the_package_writes_are_read_by_us(tmp_path):
    tensors = sample()
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})

    ours = load_safetensors(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors)
    for name, t in tensors.items():
        assert_same(ours[name], t)
    assert read_safetensors_metadata(tmp_path / "theirs.safetensors") == {"format": "pt"}
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert set(f.keys()) == set(tensors)
        assert all(f.shape(n) == tuple(t.shape) and f.dtype(n) == t.dtype for n, t in tensors.items())


def test_round_trip_keeps_order_and_aligns_every_tensor(tmp_path):
    tensors = sample()
    save_safetensors(tensors, tmp_path / "x.safetensors")
    header = header_of(tmp_path / "x.safetensors")
    assert list(header.pop("__metadata__")) == ["sha256"] and list(header) == list(tensors)
    for name, info in header.items():  # aligned data is what lets readers map tensors without a copy
        assert info["data_offsets"][0] % tensors[name].element_size() == 0, name
    assert (8 + struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]) % 8 == 0
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.keys() == list(tensors)
        for name, t in tensors.items():
            assert_same(f.get(name), t)


def test_writing_a_contiguous_cpu_tensor_does_not_copy_it():
    t = torch.randn(4, 8).bfloat16()
    view = weights._bytes_of(t)
    assert len(view) == t.numel() * 2 and torch.frombuffer(view, dtype=torch.uint8).data_ptr() == t.data_ptr()


def test_misaligned_tensors_from_other_writers_are_read_correctly(tmp_path):
    # One byte of U8 first puts the F32 tensor at an odd offset, which a zero-copy view cannot express.
    values = torch.tensor([1.5, -2.0, 3.25])
    header = {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    path = raw_file(tmp_path / "odd.safetensors", header, b"\x07" + values.numpy().tobytes())
    loaded = load_safetensors(path)
    assert loaded["b"].tolist() == [7] and torch.equal(loaded["f"], values)
    with SafetensorsFile(path) as f:  # what kernels see is aligned for its dtype
        assert f._view("f").data_ptr() % 4 == 0


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("wanted", [torch.float32, torch.bfloat16])
def test_copy_into_converts_dtype_as_torch_does(tmp_path, stored, wanted):
    t = (torch.randn(6, 10) * 100).to(stored)
    safetensors.torch.save_file({"w": t}, tmp_path / "w.safetensors")
    out = torch.full((6, 10), float("nan"), dtype=wanted)
    with SafetensorsFile(tmp_path / "w.safetensors") as f:
        f.copy_into("w", out)
    assert torch.equal(out, t.to(wanted))


def test_copy_into_a_wrong_shape_names_tensor_shapes_and_file(tmp_path):
    save_safetensors({"w": torch.zeros(2, 3)}, tmp_path / "w.safetensors")
    with SafetensorsFile(tmp_path / "w.safetensors") as f, pytest.raises(CheckpointError) as e:
        f.copy_into("w", torch.empty(3, 2))
    assert str(e.value) == (f"{tmp_path / 'w.safetensors'}: tensor 'w' has shape (2, 3), "
                            f"but the destination has shape (3, 2)")


@pytest.mark.skipif(not (Path("/proc/self/status").exists() and hasattr(mmap, "MADV_DONTNEED")),
                    reason="needs Linux's /proc/self/status and madvise")
def test_copy_into_releases_the_pages_it_read(tmp_path):
    def rss_file_kb():  # resident pages that belong to mapped files
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("RssFile:"))
        return int(line.split()[1])

    big = torch.ones(8 * 2**20 // 4)  # 8 MiB
    save_safetensors({"big": big}, tmp_path / "big.safetensors")
    out = torch.zeros_like(big)
    with SafetensorsFile(tmp_path / "big.safetensors") as f:
        before = rss_file_kb()
        f.copy_into("big", out)
        grown_kb = rss_file_kb() - before
    assert torch.equal(out, big)
    assert grown_kb < 1024, f"{grown_kb} KiB of the 8 MiB file still resident after copy_into"


# ── malformed files: always a CheckpointError naming the file and the fault ─────────────────────

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

MALFORMED = {
    "too short": (lambda p: p.write_bytes(b"\x01\x02\x03"), "only 3 bytes, too short"),
    "header length beyond the cap": (lambda p: raw_file(p, b"{}", length=2**62), "exceeds the 100000000-byte limit"),
    "header length beyond the file": (lambda p: raw_file(p, b"{}", length=64), "header length 64 runs past the end"),
    "header not UTF-8": (lambda p: raw_file(p, b'{"\xff": 1}'), "not valid UTF-8 JSON"),
    "header not JSON": (lambda p: raw_file(p, b"{ garbage"), "not valid UTF-8 JSON"),
    "header nested too deep": (lambda p: raw_file(p, b"[" * 100_000), "not valid UTF-8 JSON"),
    "header not an object": (lambda p: raw_file(p, b"[1, 2]"), "header is a JSON list, not an object"),
    "entry not an object": (lambda p: raw_file(p, {"w": 3}), "tensor 'w': header entry 3 is not an object"),
    "duplicate name": (lambda p: raw_file(p, b'{"w": 1, "w": 2}'), "header names ['w'] twice"),
    "metadata not str": (lambda p: raw_file(p, {"__metadata__": {"step": 3}}), "__metadata__ must map str to str"),
    "metadata not a dict": (lambda p: raw_file(p, {"__metadata__": []}), "__metadata__ must map str to str"),
    "unknown dtype": (lambda p: raw_file(p, {"w": F32x2 | {"dtype": "F7"}}, bytes(8)),
                      "tensor 'w': unknown dtype 'F7'"),
    "negative dim": (lambda p: raw_file(p, {"w": F32x2 | {"shape": [-2]}}, bytes(8)), "shape [-2] is not a list"),
    "string dim": (lambda p: raw_file(p, {"w": F32x2 | {"shape": ["2"]}}, bytes(8)), "shape ['2'] is not a list"),
    "offsets not a pair": (lambda p: raw_file(p, {"w": F32x2 | {"data_offsets": [0]}}, bytes(8)),
                           "data_offsets [0] is not a pair"),
    "offsets reversed": (lambda p: raw_file(p, {"w": F32x2 | {"data_offsets": [8, 0]}}, bytes(8)),
                         "data_offsets [8, 0] is not a pair"),
    "offsets past the data": (lambda p: raw_file(p, {"w": F32x2 | {"data_offsets": [8, 16]}}, bytes(8)),
                              "data_offsets [8, 16] run past the 8 bytes of data"),
    "wrong byte count": (lambda p: raw_file(p, {"w": F32x2 | {"data_offsets": [0, 4]}}, bytes(8)),
                         "data_offsets [0, 4] hold 4 bytes, but shape [2] of F32 needs 8"),
    "overlapping tensors": (lambda p: raw_file(p, {"a": F32x2, "b": F32x2 | {"data_offsets": [4, 12]}}, bytes(12)),
                            "tensors 'a' and 'b' overlap"),
    "truncated data": (lambda p: raw_file(p, {"w": F32x2 | {"shape": [4], "data_offsets": [0, 16]}}, bytes(10)),
                       "run past the 10 bytes of data (truncated file?)"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file_is_refused_with_the_file_and_fault_named(tmp_path, case):
    make, fault = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    for read in (load_safetensors, SafetensorsFile):
        with pytest.raises(CheckpointError) as e:
            read(path)
        assert str(path) in str(e.value) and fault in str(e.value), str(e.value)


def test_every_truncation_of_a_good_file_is_refused(tmp_path):
    tensors = {"w": torch.randn(2, 3), "b": torch.randn(3).bfloat16(), "n": torch.arange(2), "e": torch.zeros(0)}
    save_safetensors(tensors, tmp_path / "good.safetensors", metadata={"a": "b"})
    raw = (tmp_path / "good.safetensors").read_bytes()
    assert load_safetensors(tmp_path / "good.safetensors").keys() == tensors.keys()
    for n in range(len(raw)):
        (tmp_path / "cut.safetensors").write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match="cut.safetensors"):
            load_safetensors(tmp_path / "cut.safetensors")


def test_corrupted_headers_never_escape_as_other_errors(tmp_path):
    save_safetensors(sample(), tmp_path / "good.safetensors")
    raw = bytearray((tmp_path / "good.safetensors").read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    rng, refused = random.Random(0), 0
    for _ in range(300):
        bad = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(header_end)] = rng.randrange(256)
        (tmp_path / "bad.safetensors").write_bytes(bad)
        try:  # a flip may leave a valid file (e.g. a renamed tensor); anything else must be a CheckpointError
            load_safetensors(tmp_path / "bad.safetensors")
        except CheckpointError:
            refused += 1
    assert refused > 200


def test_a_missing_file_is_a_checkpoint_error(tmp_path):
    for read in (load_safetensors, read_safetensors_metadata):
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope.safetensors'}: cannot open"):
            read(tmp_path / "nope.safetensors")


def test_asking_for_an_absent_tensor_names_it_and_the_file(tmp_path):
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with SafetensorsFile(tmp_path / "w.safetensors") as f:
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'w.safetensors'}: no tensor named 'v'"):
            f.shape("v")


# ── writing: refuses what it cannot store, and is atomic ────────────────────────────────────────

@pytest.mark.parametrize("tensors, metadata, error, message", [
    ({"w": [1.0, 2.0]}, None, TypeError, "'w' must be a dense tensor with data, got list"),
    ({3: torch.zeros(1)}, None, TypeError, "tensor names must be str, got 3"),
    ({"w": torch.zeros(2, dtype=torch.complex64)}, None, TypeError, "dtype torch.complex64"),
    ({"w": torch.zeros(2).to_sparse()}, None, TypeError, "must be a dense tensor"),
    ({"__metadata__": torch.zeros(1)}, None, CheckpointError, "'__metadata__' is reserved"),
    ({"w": torch.zeros(1)}, {"step": 3}, TypeError, "metadata must map str to str"),
])
def test_save_refuses_what_safetensors_cannot_hold(tmp_path, tensors, metadata, error, message):
    with pytest.raises(error, match=message) as e:
        save_safetensors(tensors, tmp_path / "x.safetensors", metadata)
    assert str(tmp_path / "x.safetensors") in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    save_safetensors({"w": torch.ones(3)}, path)
    good = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_safetensors({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]

    monkeypatch.undo()
    save_safetensors({"w": torch.zeros(5)}, path)
    assert torch.equal(load_safetensors(path)["w"], torch.zeros(5)) and list(tmp_path.iterdir()) == [path]


# ── Hugging Face directories ───────────────────────────────────────────────────────────────────

WEIGHTS = {"model.embed_tokens.weight": torch.randn(10, 4), "model.norm.weight": torch.randn(4).bfloat16(),
           "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4), "lm_head.weight": torch.randn(10, 4)}


def write_index(directory: Path, name: str, shards: dict[str, list[str]]):
    weight_map = {tensor: shard for shard, tensors in shards.items() for tensor in tensors}
    (directory / name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def write_directory(directory: Path, layout: str) -> Path:
    directory.mkdir()
    first, second = list(WEIGHTS)[:2], list(WEIGHTS)[2:]
    if layout == "safetensors":
        save_safetensors(WEIGHTS, directory / "model.safetensors")
    elif layout == "sharded safetensors":
        shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
        for shard, names in shards.items():
            safetensors.torch.save_file({n: WEIGHTS[n] for n in names}, directory / shard)
        write_index(directory, "model.safetensors.index.json", shards)
    elif layout == "bin":
        torch.save(WEIGHTS, directory / "pytorch_model.bin")
    elif layout == "legacy bin":  # the pre-zip format, which cannot be memory-mapped
        torch.save(WEIGHTS, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    elif layout == "sharded bin":
        shards = {"pytorch_model-00001-of-00002.bin": first, "pytorch_model-00002-of-00002.bin": second}
        for shard, names in shards.items():
            torch.save({n: WEIGHTS[n] for n in names}, directory / shard)
        write_index(directory, "pytorch_model.bin.index.json", shards)
    return directory


@pytest.mark.parametrize("layout", ["safetensors", "sharded safetensors", "bin", "legacy bin", "sharded bin"])
def test_open_weights_reads_every_layout(tmp_path, layout):
    directory = write_directory(tmp_path / "model", layout)
    n_files = 2 if layout.startswith("sharded") else 1
    assert len(find_weight_files(directory)) == n_files
    with open_weights(directory) as reader:
        assert reader.shapes == {n: tuple(t.shape) for n, t in WEIGHTS.items()}
        assert reader.dtypes == {n: t.dtype for n, t in WEIGHTS.items()}
        for name, t in WEIGHTS.items():
            out = torch.empty(t.shape, dtype=torch.float32)
            reader.copy_into(name, out)
            assert torch.equal(out, t.float()), name
        with pytest.raises(CheckpointError, match="no tensor named 'model.nope'"):
            reader.copy_into("model.nope", out)


def test_safetensors_is_preferred_over_bin(tmp_path):
    directory = write_directory(tmp_path / "model", "bin")
    save_safetensors(WEIGHTS, directory / "model.safetensors")
    assert find_weight_files(directory) == [directory / "model.safetensors"]


@pytest.mark.parametrize("make", [lambda d: None, lambda d: d.mkdir()], ids=["missing", "empty"])
def test_a_directory_without_weights_names_it_and_the_files_looked_for(tmp_path, make):
    directory = tmp_path / "llama"
    make(directory)
    with pytest.raises(CheckpointError) as e:
        open_weights(directory)
    assert str(e.value).startswith(str(directory))
    assert all(name in str(e.value) for name in weights.WEIGHT_FILES)


def test_a_missing_shard_names_the_index_and_the_shard(tmp_path):
    directory = write_directory(tmp_path / "model", "sharded safetensors")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        find_weight_files(directory)
    assert str(directory / "model.safetensors.index.json") in str(e.value)
    assert "model-00002-of-00002.safetensors" in str(e.value)


@pytest.mark.parametrize("index, fault", [
    ("{", "not a readable index file"),
    ('{"weight_map": {}}', "needs a non-empty 'weight_map'"),
    ('{"weight_map": {"w": "../model.safetensors"}}', "'../model.safetensors', which is not a file name"),
])
def test_a_bad_index_is_refused(tmp_path, index, fault):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as e:
        find_weight_files(tmp_path)
    assert fault in str(e.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    directory = write_directory(tmp_path / "model", "sharded safetensors")
    save_safetensors({"model.norm.weight": torch.zeros(4)}, directory / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in both .*00001.* and .*00002"):
        open_weights(directory)


def test_a_bin_with_pickled_code_is_refused_without_running_it(tmp_path):
    directory, mark = tmp_path / "model", tmp_path / "mark"
    directory.mkdir()
    torch.save({"w": torch.zeros(2), "evil": Payload(str(mark))}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        open_weights(directory)
    assert str(directory / "pytorch_model.bin") in str(e.value) and "Unsupported global" in str(e.value)
    assert "weights_only=False" not in str(e.value)  # the advice torch gives is not for untrusted files
    assert not mark.exists()


@pytest.mark.parametrize("content", [b"not a pickle", None], ids=["garbage", "list of tensors"])
def test_a_bin_that_is_not_a_state_dict_is_refused(tmp_path, content):
    path = tmp_path / "pytorch_model.bin"
    if content is None:
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path}: "):
        open_weights(tmp_path)


# ── checksums ────────────────────────────────────────────────────────────────────────────────────

def test_a_flipped_byte_in_any_tensor_is_caught_by_its_checksum(tmp_path):
    tensors = sample()
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path)
    raw = path.read_bytes()
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    for name, info in header_of(path).items():
        if name == "__metadata__" or info["data_offsets"][0] == info["data_offsets"][1]:
            continue
        flipped = bytearray(raw)
        flipped[data_start + info["data_offsets"][0]] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"tensor '{name}' does not match its sha256 checksum"):
            load_safetensors(path)
    path.write_bytes(raw)
    assert set(load_safetensors(path)) == set(tensors)
    save_safetensors(tensors, path, checksums=False)  # without checksums a flip goes unseen: the reason for them
    assert CHECKSUMS not in read_safetensors_metadata(path)


def test_malformed_checksums_are_refused(tmp_path):
    path = raw_file(tmp_path / "x.safetensors", {"__metadata__": {"sha256": "[1, 2]"}})
    with pytest.raises(CheckpointError, match="'sha256' is not a JSON object of tensor name -> checksum"):
        load_safetensors(path)


def test_copy_into_reads_one_shard_of_rows(tmp_path):
    """What an FSDP process loads (parallel.load_sharded): rows [start, start + len(out)) of a tensor."""
    t = torch.arange(24, dtype=torch.float32).view(6, 4)
    save_safetensors({"w": t}, tmp_path / "a.safetensors")
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        out = torch.empty(2, 4)
        f.copy_into("w", out, start=3)
        assert torch.equal(out, t[3:5])
        f.copy_into("w", torch.empty(0, 4), start=6)  # the empty shard of a process past the last row
        with pytest.raises(CheckpointError, match=r"has shape \(6, 4\), but the destination has shape \(2, 4\) "
                                                  r"from row 5$"):
            f.copy_into("w", torch.empty(2, 4), start=5)
