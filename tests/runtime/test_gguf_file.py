"""The GGUF header reader gives what ``gguf.GGUFReader`` gives (metadata of every value type, the tensor
table and its data), skips long arrays when asked, and names the file when it is not a readable GGUF."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from hetserve.runtime.model.gguf_file import (  # noqa: E402 - after the gguf check
    SMALL_ARRAY,
    GGUFFile,
    GGUFFormatError,
    SkippedArray,
)
from hetserve.runtime.model.loading import load_gguf  # noqa: E402

VOCAB = [f"tok{i}" for i in range(SMALL_ARRAY * 3)] + ["ĠParis", "日本", ""]


def write_sample(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.125)
    w.add_uint64("t.u64", 2**40 + 3)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.small", [1.5, 2.5, 4.0])
    w.add_array("t.ints", list(range(SMALL_ARRAY * 2)))
    w.add_array("tokenizer.ggml.tokens", VOCAB)
    rng = np.random.default_rng(0)
    w.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.f16", rng.standard_normal((2, 7)).astype(np.float16))
    m = rng.standard_normal((4, 64)).astype(np.float32)
    q = gguf.quants.quantize(m, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reader_meta(reader):
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        values = [field.parts[i] for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            values = [bytes(v).decode("utf-8") for v in values]
        else:
            values = [v.tolist()[0] for v in values]
        out[name] = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
    return out


def test_metadata_and_tensors_match_the_gguf_library(tmp_path):
    path = write_sample(tmp_path / "sample.gguf")
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    expected = reader_meta(theirs)
    assert ours.meta == expected
    assert ours.meta["t.str"] == "héllo" and ours.meta["tokenizer.ggml.tokens"] == VOCAB
    assert ours.meta["t.u64"] == 2**40 + 3 and ours.meta["t.bool"] is True
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type
        assert a.shape == tuple(b.shape.tolist())
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    q8 = ours.tensors[2]
    assert gguf.quants.dequantize(q8.data, q8.tensor_type).shape == (4, 64)


def test_long_arrays_are_skipped_when_not_wanted(tmp_path):
    path = write_sample(tmp_path / "sample.gguf")
    full, lean = GGUFFile(path), GGUFFile(path, arrays=False)
    assert lean.meta["tokenizer.ggml.tokens"] == SkippedArray(8, len(VOCAB))
    assert len(lean.meta["tokenizer.ggml.tokens"]) == len(VOCAB)
    assert isinstance(lean.meta["t.ints"], SkippedArray) and len(lean.meta["t.ints"]) == SMALL_ARRAY * 2
    assert lean.meta["t.small"] == [1.5, 2.5, 4.0]
    assert {k: v for k, v in lean.meta.items() if not isinstance(v, SkippedArray)} == {
        k: v for k, v in full.meta.items() if k not in ("tokenizer.ggml.tokens", "t.ints")
    }
    for a, b in zip(lean.tensors, full.tensors):
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))


def test_a_truncated_or_foreign_file_is_one_clear_error(tmp_path):
    path = write_sample(tmp_path / "sample.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])  # the last tensor's data is missing
    with pytest.raises(GGUFFormatError, match=r"cut\.gguf: tensor c\.q8 runs past the end"):
        GGUFFile(cut)
    header = tmp_path / "header.gguf"
    for size in (15, 200):  # inside the counts, inside the metadata
        header.write_bytes(data[:size])
        with pytest.raises(GGUFFormatError, match=r"header\.gguf: truncated GGUF header"):
            GGUFFile(header)
    other = tmp_path / "model.bin"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFFormatError, match=r"model\.bin: not a GGUF file"):
        load_gguf(other)
