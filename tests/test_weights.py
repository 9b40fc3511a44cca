"""weights.py against the `safetensors` package (both directions), and every way a file can be bad."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights import (CheckpointError, SafetensorsFile, find_weight_files, load_safetensors, open_weights,
                        read_safetensors_metadata, save_safetensors)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "f16": torch.randn(2, 3, generator=g).half(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i64": torch.arange(-3, 4),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # Compare bytes: float8 has no equality kernel, and NaN-free bytes are the strictest check.
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_our_writer_is_read_by_the_package(tmp_path):
    tensors = sample_tensors()
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "note": "ü"})
    assert_same(load_file(tmp_path / "x.safetensors"), tensors)
    assert read_safetensors_metadata(tmp_path / "x.safetensors") == {"format": "pt", "note": "ü"}
    assert (tmp_path / "x.safetensors").read_bytes()[:8] != b"\0" * 8
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left


def test_package_files_are_read_by_ours(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    assert_same(load_safetensors(tmp_path / "x.safetensors"), tensors)
    assert read_safetensors_metadata(tmp_path / "x.safetensors") == {"k": "v"}


def test_copy_into_converts_like_torch(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.shape("f32") == (3, 4) and f.dtype("bf16") == torch.bfloat16
        for name in ("bf16", "f16", "f64", "i64"):
            out = torch.empty(tensors[name].shape, dtype=torch.float32)
            f.copy_into(name, out)
            assert torch.equal(out, tensors[name].float()), name
        with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'f32' has shape \(3, 4\), expected \(4, 3\)"):
            f.copy_into("f32", torch.empty(4, 3))


def test_misaligned_offsets_are_read_correctly(tmp_path):
    # A valid file whose f32 tensor starts at an odd byte: other writers may produce this.
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    raw = json.dumps(header).encode()
    data = b"\x07" + torch.tensor([1.5, -2.0]).numpy().tobytes()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert torch.equal(loaded["b"], torch.tensor([1.5, -2.0])) and loaded["a"].item() == 7
    assert torch.equal(load_file(tmp_path / "m.safetensors")["b"], loaded["b"])


def write_raw(path, header, data: bytes, length=None):
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header, data, length, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "lie outside the 4 data bytes"),
    ({}, b"", 10**6, "header length 1000000 exceeds the file size"),
    (b"\xff\xfe not json", b"", None, "header is not valid UTF-8 JSON"),
    (b"[1, 2]", b"", None, "header is not a JSON object"),
    ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown or missing dtype 'Q7'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "is not a list of non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "4 bytes for shape [2] of F32, which needs 8"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "lie outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "'a' and 'b' overlap"),
    ({"__metadata__": {"k": 1}}, b"", None, "__metadata__ must map strings to strings"),
])
def test_malformed_files_name_the_file(tmp_path, header, data, length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError) as e:
        load_safetensors(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_truncated_and_tiny_files(tmp_path):
    save_safetensors(sample_tensors(), tmp_path / "x.safetensors")
    whole = (tmp_path / "x.safetensors").read_bytes()
    for cut in (3, 8, 40, len(whole) - 1):
        (tmp_path / "cut.safetensors").write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="cut.safetensors"):
            load_safetensors(tmp_path / "cut.safetensors")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    class Exploding(torch.Tensor):  # a tensor whose bytes cannot be taken: the write fails midway
        def cpu(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.ones(3), "b": torch.ones(2).as_subclass(Exploding)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_writer_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="str -> Tensor"):
        save_safetensors({"a": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_safetensors({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"k": 1})
    with pytest.raises(TypeError, match="complex64"):
        save_safetensors({"a": torch.ones(1, dtype=torch.complex64)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# ── Hugging Face directories ─────────────────────────────────────────────────────────────────

def state():
    return {"model.embed_tokens.weight": torch.randn(6, 4), "model.norm.weight": torch.randn(4),
            "lm_head.weight": torch.randn(6, 4).bfloat16()}


def read_all(directory):
    with open_weights(directory) as reader:
        out = {}
        for name, shape in reader.shapes.items():
            out[name] = torch.empty(shape)
            reader.copy_into(name, out[name])
        return out


def shard(tmp_path, kind):
    s = state()
    names = list(s)
    parts = {f"part-0000{i + 1}.{kind}": {n: s[n] for n in names[i::2]} for i in range(2)}
    for file, tensors in parts.items():
        if kind == "safetensors":
            save_safetensors(tensors, tmp_path / file)
        else:
            torch.save(tensors, tmp_path / file)
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    weight_map = {n: file for file, tensors in parts.items() for n in tensors}
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return s


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded safetensors", "sharded bin"])
def test_every_directory_layout_reads_the_same(tmp_path, layout):
    if layout == "safetensors":
        s = state()
        save_safetensors(s, tmp_path / "model.safetensors")
    elif layout == "bin":
        s = state()
        torch.save(s, tmp_path / "pytorch_model.bin")
    else:
        s = shard(tmp_path, layout.split()[1])
    got = read_all(tmp_path)
    assert got.keys() == s.keys()
    for k in s:
        assert torch.equal(got[k], s[k].float()), k
    assert len(find_weight_files(tmp_path)) == (2 if layout.startswith("sharded") else 1)


def test_directory_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such directory"):
        find_weight_files(tmp_path / "nowhere")
    with pytest.raises(CheckpointError) as e:
        find_weight_files(tmp_path)
    assert str(tmp_path) in str(e.value) and "model.safetensors, model.safetensors.index.json" in str(e.value)
    shard(tmp_path, "safetensors")
    (tmp_path / "part-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json lists shard\(s\) that do not exist: "
                                              r"part-00002.safetensors"):
        find_weight_files(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_safetensors({"a": torch.ones(1)}, tmp_path / "s1.safetensors")
    save_safetensors({"a": torch.ones(1)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="tensor 'a' is in both"):
        open_weights(tmp_path)


class NotATensor:  # pickled by reference: loading it would import and run this module's code
    pass


def test_bin_with_code_is_refused(tmp_path):
    torch.save({"a": torch.ones(1), "evil": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be loaded as a weights-only state dict"):
        open_weights(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip nor a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be loaded"):
        open_weights(tmp_path)
