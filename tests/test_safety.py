"""File safety: a corpus of malformed and hostile files, each refused with the right one-line message, plus
valid files that pass, NaN/Inf findings, and proof that no pickle is ever executed."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sau_core import safety
from sau_core.errors import SauError, UnsafeFileError
from sau_core.safety import (
    MAX_HEADER_BYTES,
    SafetensorsInfo,
    TensorEntry,
    load_safetensors,
    refuse_if_pickle,
    validate_safetensors,
)


# ------------------------------------------------------------------------------------------------------------
# Builders: every hostile file is generated here, in tmp_path.


def raw_file(path: Path, header: bytes, data: bytes = b"", n: int | None = None) -> Path:
    """A safetensors-shaped file: 8-byte little-endian length (``n`` overrides it), header bytes, data."""
    length = len(header) if n is None else n
    path.write_bytes(struct.pack("<Q", length) + header + data)
    return path


def st_file(path: Path, header: dict | str, data: bytes = b"", n: int | None = None) -> Path:
    text = header if isinstance(header, str) else json.dumps(header)
    return raw_file(path, text.encode("utf-8"), data, n)


def f32(shape, start, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


class _Evil:
    """Unpickling this would create the marker file (runs builtins.open)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_zip_bytes() -> bytes:
    """A file laid out like torch.save's zip format, built with zipfile (no torch involved)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"weight": [1.0, 2.0]}))
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/data/0", b"\x00" * 8)
    return buf.getvalue()


def real_torch_save(path: Path, legacy: bool = False) -> Path:
    # Writing with torch.save is fine; the tests never load it.
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=not legacy)
    return path


# (id, file name, builder(path) -> path, distinctive substring expected in the message)
CORPUS = [
    ("empty-file", "m.safetensors", lambda p: (p.write_bytes(b""), p)[1], "is empty (0 bytes)"),
    ("truncated-length", "m.safetensors", lambda p: (p.write_bytes(b"\x10\x00\x00\x00\x00"), p)[1],
     "fewer than the 8-byte header length field"),
    ("length-larger-than-file", "m.safetensors", lambda p: st_file(p, '{"a": 1}', n=1000),
     "header length says 1000 bytes but only 8 bytes follow"),
    ("header-bomb", "m.safetensors", lambda p: st_file(p, "{}", n=2**63), "header bomb"),
    ("header-just-over-limit", "m.safetensors", lambda p: st_file(p, "{}", n=MAX_HEADER_BYTES + 1),
     "over the 100.0 MB"),
    ("zero-length-header", "m.safetensors", lambda p: raw_file(p, b"", b"xxxx"), "empty header (length 0)"),
    ("non-utf8-header", "m.safetensors", lambda p: raw_file(p, b'{"\xff\xfe": 1}'), "not valid UTF-8"),
    ("non-json-header", "m.safetensors", lambda p: st_file(p, "{not json at all}"), "not valid JSON"),
    ("json-nan-constant", "m.safetensors",
     lambda p: st_file(p, '{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
     "non-standard JSON constant NaN"),
    ("json-array-header", "m.safetensors", lambda p: st_file(p, "[1, 2, 3]"), "is a JSON array, not an object"),
    ("json-string-header", "m.safetensors", lambda p: st_file(p, '"hello"'), "is a JSON string, not an object"),
    ("deeply-nested-json", "m.safetensors", lambda p: st_file(p, '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
     "nested too deeply"),
    ("leading-whitespace", "m.safetensors", lambda p: st_file(p, ' {"a": ' + json.dumps(f32([1], 0, 4)) + "}",
                                                              b"\x00" * 4),
     "does not start with '{'"),
    ("duplicate-tensor-keys", "m.safetensors",
     lambda p: st_file(p, '{"a": %s, "a": %s}' % (json.dumps(f32([1], 0, 4)), json.dumps(f32([1], 0, 4))),
                       b"\x00" * 4),
     "duplicate key 'a'"),
    ("duplicate-field-keys", "m.safetensors",
     lambda p: st_file(p, '{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
                       b"\x00" * 4),
     "duplicate key 'dtype'"),
    ("duplicate-metadata-keys", "m.safetensors",
     lambda p: st_file(p, '{"__metadata__": {"k": "1", "k": "2"}}'), "duplicate key 'k'"),
    ("entry-not-object", "m.safetensors", lambda p: st_file(p, {"a": "F32"}), "described by a JSON string"),
    ("bad-dtype", "m.safetensors",
     lambda p: st_file(p, {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\x00" * 16),
     "unknown dtype 'F128'"),
    ("dtype-not-string", "m.safetensors",
     lambda p: st_file(p, {"a": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
     "unknown dtype a JSON number"),
    ("negative-shape", "m.safetensors", lambda p: st_file(p, {"a": f32([-1, 4], 0, 16)}, b"\x00" * 16),
     "negative dimension"),
    ("float-shape", "m.safetensors", lambda p: st_file(p, {"a": f32([2.0], 0, 8)}, b"\x00" * 8),
     "non-integer dimension"),
    ("bool-shape", "m.safetensors", lambda p: st_file(p, {"a": f32([True], 0, 4)}, b"\x00" * 4),
     "non-integer dimension"),
    ("shape-not-list", "m.safetensors", lambda p: st_file(p, {"a": f32(4, 0, 16)}, b"\x00" * 16),
     "shape that is a JSON number, not a list"),
    ("offsets-one-int", "m.safetensors",
     lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, b"\x00" * 4),
     "they must be two integers"),
    ("offsets-strings", "m.safetensors",
     lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\x00" * 4),
     "they must be two integers"),
    ("offsets-negative", "m.safetensors", lambda p: st_file(p, {"a": f32([1], -4, 0)}, b"\x00" * 4),
     "negative data_offsets"),
    ("offsets-reversed", "m.safetensors", lambda p: st_file(p, {"a": f32([0], 4, 0)}, b"\x00" * 4),
     "end before they start"),
    ("missing-field", "m.safetensors",
     lambda p: st_file(p, {"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\x00" * 4),
     "missing its 'shape' field"),
    ("extra-field", "m.safetensors",
     lambda p: st_file(p, {"a": {**f32([1], 0, 4), "evil": "x"}}, b"\x00" * 4), "unexpected field 'evil'"),
    ("offsets-overlap", "m.safetensors",
     lambda p: st_file(p, {"a": f32([4], 0, 16), "b": f32([2], 8, 16)}, b"\x00" * 16),
     "overlapping tensors 'a' (data offsets 0-16) and 'b' (data offsets 8-16)"),
    ("offsets-alias", "m.safetensors",
     lambda p: st_file(p, {"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, b"\x00" * 8), "overlapping tensors"),
    ("gap-between-tensors", "m.safetensors",
     lambda p: st_file(p, {"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, b"\x00" * 20),
     "gap of 4 unused bytes between tensors 'a' and 'b'"),
    ("gap-before-first", "m.safetensors", lambda p: st_file(p, {"a": f32([2], 4, 12)}, b"\x00" * 12),
     "4 unused bytes before the first tensor 'a'"),
    ("offsets-beyond-file", "m.safetensors", lambda p: st_file(p, {"a": f32([4], 0, 16)}, b"\x00" * 8),
     "beyond the end of the file"),
    ("trailing-bytes", "m.safetensors", lambda p: st_file(p, {"a": f32([2], 0, 8)}, b"\x00" * 12),
     "4 trailing bytes after the last tensor"),
    ("trailing-bytes-no-tensors", "m.safetensors", lambda p: st_file(p, {}, b"hidden payload"),
     "14 trailing bytes after the header"),
    ("dtype-shape-mismatch", "m.safetensors", lambda p: st_file(p, {"a": f32([3], 0, 8)}, b"\x00" * 8),
     "should take 12 bytes (F32 x shape [3]) but its data_offsets span 8 bytes"),
    ("f4-half-byte", "m.safetensors",
     lambda p: st_file(p, {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\x00" * 2),
     "do not fill a whole number of bytes"),
    ("metadata-non-string", "m.safetensors", lambda p: st_file(p, {"__metadata__": {"k": 1}}),
     "entry 'k' whose value is a JSON number; metadata values must be strings"),
    ("metadata-nested", "m.safetensors", lambda p: st_file(p, {"__metadata__": {"k": {"x": "y"}}}),
     "whose value is a JSON object"),
    ("metadata-not-dict", "m.safetensors", lambda p: st_file(p, {"__metadata__": ["x"]}),
     "__metadata__ that is a JSON array"),
    ("metadata-null", "m.safetensors", lambda p: st_file(p, {"__metadata__": None}),
     "__metadata__ that is a JSON null"),
    ("pickle-renamed", "m.safetensors", lambda p: (p.write_bytes(pickle.dumps({"w": [1.0]})), p)[1],
     "is a Python pickle (protocol"),
    ("pickle-protocol2-renamed", "m.safetensors",
     lambda p: (p.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2)), p)[1], "Python pickle (protocol 2) renamed"),
    ("torch-zip-renamed", "m.safetensors", lambda p: (p.write_bytes(torch_zip_bytes()), p)[1],
     "torch's zip format (it holds 'archive/data.pkl', a pickle) renamed to .safetensors"),
    ("real-torch-save-renamed", "m.safetensors", real_torch_save, "torch's zip format"),
    ("torch-legacy-pt", "m.pt", lambda p: real_torch_save(p, legacy=True), "torch's legacy format (a pickle)"),
    ("damaged-zip", "m.safetensors", lambda p: (p.write_bytes(b"PK\x03\x04" + b"\x00" * 40), p)[1],
     "damaged zip archive"),
    ("ckpt-extension", "model.ckpt", lambda p: (p.write_bytes(pickle.dumps({"state_dict": {}})), p)[1],
     "model.ckpt is a PyTorch pickle checkpoint; SAU never unpickles files"),
    ("ckpt-torch-zip", "model.ckpt", lambda p: (p.write_bytes(torch_zip_bytes()), p)[1],
     "model.ckpt is a PyTorch checkpoint in torch's zip format"),
    ("bin-extension", "pytorch_model.bin", lambda p: (p.write_bytes(pickle.dumps({"w": 1})), p)[1],
     "pytorch_model.bin is a PyTorch pickle weights file"),
    ("bin-extension-garbage", "pytorch_model.bin", lambda p: (p.write_bytes(b"garbage!" * 4), p)[1],
     "pytorch_model.bin is a PyTorch pickle weights file"),
    ("pth-extension", "m.pth", lambda p: (p.write_bytes(pickle.dumps([1, 2])), p)[1], "PyTorch pickle file"),
    ("pkl-extension", "m.pkl", lambda p: (p.write_bytes(pickle.dumps([1, 2])), p)[1], "m.pkl is a Python pickle"),
    ("safetensors-named-ckpt", "model.ckpt",
     lambda p: (save_file({"a": torch.zeros(2)}, str(p)), p)[1], "rename it to model.safetensors"),
    ("unknown-extension", "notes.txt", lambda p: (p.write_text("hello"), p)[1],
     "notes.txt is not a .safetensors file; SAU only reads model weights"),
    ("gguf-extension", "m.gguf", lambda p: (p.write_bytes(b"GGUF" + b"\x00" * 60), p)[1],
     "is not a .safetensors file (it is a GGUF file)"),
    ("git-lfs-pointer", "m.safetensors",
     lambda p: (p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"), p)[1],
     "Git LFS pointer file"),
    ("html-page", "m.safetensors", lambda p: (p.write_text("<!DOCTYPE html><html>Sign in</html>"), p)[1],
     "HTML/XML page (a failed or login-protected download?)"),
    ("directory", "m.safetensors", lambda p: (p.mkdir(), p)[1], "is a directory, not a .safetensors file"),
    ("missing-file", "m.safetensors", lambda p: p, "does not exist"),
]


@pytest.mark.parametrize("case_id, filename, build, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_is_refused_with_the_right_message(tmp_path, case_id, filename, build, expected):
    path = build(tmp_path / filename)
    with pytest.raises(UnsafeFileError) as excinfo:
        validate_safetensors(path)
    message = str(excinfo.value)
    assert expected in message
    assert message.startswith(str(path)), message
    assert "\n" not in message and "\r" not in message
    assert isinstance(excinfo.value, SauError)
    # The loader refuses the same way (it is the same validator).
    with pytest.raises(UnsafeFileError, match=None) as excinfo2:
        load_safetensors(path)
    assert str(excinfo2.value) == message


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize(
    "filename, content, expected",
    [
        ("m.safetensors", pickle.dumps({"a": 1}), "Python pickle"),
        ("m.safetensors", torch_zip_bytes(), "torch's zip format"),
        ("m.ckpt", pickle.dumps({"a": 1}), "PyTorch pickle checkpoint"),
        ("m.bin", b"\x00" * 32, "PyTorch pickle weights file"),
        ("m.onnx", b"\x08\x07" * 32, "is not a .safetensors file"),
    ],
)
def test_refuse_if_pickle_explains(tmp_path, filename, content, expected):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(UnsafeFileError, match=expected):
        refuse_if_pickle(path)


def test_refuse_if_pickle_returns_for_safetensors(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    assert refuse_if_pickle(path) is None
    assert refuse_if_pickle(str(path)) is None


def test_refuse_if_pickle_missing_and_directory(tmp_path):
    with pytest.raises(UnsafeFileError, match="does not exist"):
        refuse_if_pickle(tmp_path / "nope.safetensors")
    with pytest.raises(UnsafeFileError, match="is a directory"):
        refuse_if_pickle(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# No pickle is ever executed.


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make any attempt to unpickle fail the test loudly."""

    def boom(*args, **kwargs):  # pragma: no cover - only runs on a bug
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)


@pytest.mark.parametrize("filename", ["evil.safetensors", "evil.ckpt", "evil.pt", "evil.bin", "evil.pkl", "evil"])
@pytest.mark.parametrize("wrap", ["raw", "torch-zip"])
def test_malicious_pickle_is_never_executed(tmp_path, no_unpickling, filename, wrap):
    marker = tmp_path / "pwned.txt"
    payload = pickle.dumps({"state_dict": _Evil(marker)})
    if wrap == "torch-zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
        payload = buf.getvalue()
    path = tmp_path / filename
    path.write_bytes(payload)

    for call in (validate_safetensors, load_safetensors, refuse_if_pickle):
        with pytest.raises(UnsafeFileError) as excinfo:
            call(path)
        assert "never unpickles" in str(excinfo.value)
        assert "a pickle can run code" in str(excinfo.value)
    assert not marker.exists()


def test_marker_payload_really_is_dangerous(tmp_path):
    """Sanity check of the test itself: the payload does create the marker when (deliberately) unpickled."""
    marker = tmp_path / "pwned.txt"
    payload = pickle.dumps(_Evil(marker))
    handle = pickle.loads(payload)  # our own payload, built just above
    handle.close()
    assert marker.exists()


# ------------------------------------------------------------------------------------------------------------
# Valid files.


def test_valid_file_passes_with_details(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {
        "unet.w": torch.randn(4, 3, dtype=torch.float16),
        "unet.b": torch.randn(3, dtype=torch.float32),
        "ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 7),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "sau.note": "hello"})
    info = validate_safetensors(path)
    assert isinstance(info, SafetensorsInfo)
    assert info.path == path
    assert info.metadata == {"format": "pt", "sau.note": "hello"}
    assert set(info.tensors) == set(tensors)
    assert info.tensors["unet.w"].dtype == "F16" and info.tensors["unet.w"].shape == (4, 3)
    assert info.tensors["scalar"].dtype == "BF16" and info.tensors["scalar"].shape == ()
    assert info.tensors["ids"].dtype == "I64"
    assert isinstance(info.tensors["unet.b"], TensorEntry)
    assert info.tensors["unet.b"].end - info.tensors["unet.b"].start == 12
    assert info.n_params == 12 + 3 + 5 + 0 + 1
    assert info.problems == []
    assert info.values_checked
    assert info.data_offset + info.data_size == path.stat().st_size


def test_name_replaces_the_path_in_messages(tmp_path):
    path = tmp_path / "x" / "unet.safetensors"
    path.parent.mkdir()
    st_file(path, {"a": f32([3], 0, 8)}, b"\x00" * 8)
    with pytest.raises(UnsafeFileError) as excinfo:
        validate_safetensors(path, name="unet/unet.safetensors")
    assert str(excinfo.value).startswith("unet/unet.safetensors: tensor 'a'")


def test_hostile_tensor_name_cannot_break_the_line(tmp_path):
    path = st_file(tmp_path / "m.safetensors", {"evil\nname\u202e": {"dtype": "X", "shape": [], "data_offsets": [0, 0]}})
    with pytest.raises(UnsafeFileError) as excinfo:
        validate_safetensors(path)
    message = str(excinfo.value)
    assert "\n" not in message and "\u202e" not in message
    assert "'evil\\x0aname\\u202e'" in message


def test_no_tensors_is_a_problem_not_an_error(tmp_path):
    path = st_file(tmp_path / "m.safetensors", {"__metadata__": {"a": "b"}})
    info = validate_safetensors(path)
    assert info.tensors == {} and info.metadata == {"a": "b"}
    assert info.problems == ["the file contains no tensors"]


def test_header_padding_with_spaces_is_accepted(tmp_path):
    header = json.dumps({"a": f32([1], 0, 4)}).encode()
    header += b" " * (-len(header) % 8 + 8)
    path = raw_file(tmp_path / "m.safetensors", header, struct.pack("<f", 1.0))
    assert validate_safetensors(path).tensors["a"].shape == (1,)


def test_header_length_that_looks_like_a_pickle_opcode_is_not_mistaken(tmp_path):
    # A valid file whose header is exactly 0x0380 bytes starts with b"\x80\x03", a pickle's first two bytes.
    header = json.dumps({"a": f32([1], 0, 4)}).encode()
    header += b" " * (0x380 - len(header))
    path = raw_file(tmp_path / "m.safetensors", header, struct.pack("<f", 1.0))
    assert path.read_bytes()[:2] == b"\x80\x03"
    info = validate_safetensors(path)
    assert info.header_size == 0x380
    assert load_safetensors(path)["a"].item() == 1.0


def test_zero_size_tensors_may_share_an_offset(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2), "z1": torch.zeros(0), "z2": torch.zeros(0, 3), "b": torch.ones(1)}, str(path))
    info = validate_safetensors(path)
    assert info.n_params == 3


def test_round_trip_through_load_safetensors(tmp_path):
    path = tmp_path / "rt.safetensors"
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7, dtype=torch.float16),
        "bf16": torch.randn(2, 2, dtype=torch.bfloat16),
        "f64": torch.randn(4, dtype=torch.float64),
        "i8": torch.randint(-100, 100, (6,), dtype=torch.int8),
        "i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.0),
    }
    save_file(tensors, str(path), metadata={"k": "v"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------------------------------------------
# NaN / Inf scan.


def test_nan_and_inf_are_reported_as_problems(tmp_path):
    path = tmp_path / "nan.safetensors"
    a = torch.zeros(10)
    a[3] = float("nan")
    b = torch.zeros(5, dtype=torch.float16)
    b[0] = float("inf")
    b[4] = float("nan")
    c = torch.zeros(4, dtype=torch.bfloat16)
    c[1] = float("-inf")
    tensors = {
        "a": a,
        "b": b,
        "c": c,
        "clean": torch.randn(8),
        "big_but_finite": torch.full((4,), 65504.0, dtype=torch.float16),
        "ints": torch.full((4,), -1, dtype=torch.int32),  # all ones bits: must not count as NaN
    }
    save_file(tensors, str(path))
    info = validate_safetensors(path, check_values=True)
    assert info.problems == ["3 tensors contain NaN or Inf: a, b, c"]
    assert info.nonfinite == {"a": 1, "b": 2, "c": 1}

    quiet = validate_safetensors(path, check_values=False)
    assert quiet.problems == [] and quiet.nonfinite == {} and not quiet.values_checked


def test_single_nonfinite_tensor_wording(tmp_path):
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.tensor([1.0, float("inf")], dtype=torch.float64)}, str(path))
    assert validate_safetensors(path).problems == ["1 tensor contains NaN or Inf: w"]


def test_float8_and_complex_nonfinite(tmp_path):
    path = tmp_path / "f8.safetensors"
    e4 = torch.zeros(4, dtype=torch.float8_e4m3fn)
    e4[2] = float("nan")
    e5 = torch.zeros(4, dtype=torch.float8_e5m2)
    e5[1] = float("inf")
    cx = torch.zeros(3, dtype=torch.complex64)
    cx[0] = complex(0.0, float("nan"))
    fine = torch.full((4,), 448.0, dtype=torch.float8_e4m3fn)  # the largest finite e4m3fn value
    save_file({"e4": e4, "e5": e5, "cx": cx, "fine": fine}, str(path))
    info = validate_safetensors(path)
    assert info.nonfinite == {"e4": 1, "e5": 1, "cx": 1}


def test_value_scan_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "_SCAN_CHUNK_BYTES", 64)
    path = tmp_path / "chunks.safetensors"
    w = torch.zeros(1001)
    w[0] = float("nan")
    w[500] = float("inf")
    w[1000] = float("-inf")
    save_file({"w": w, "h": torch.zeros(333, dtype=torch.float16)}, str(path))
    info = validate_safetensors(path)
    assert info.nonfinite == {"w": 3}


def test_many_nonfinite_tensors_are_summarised(tmp_path):
    path = tmp_path / "many.safetensors"
    save_file({f"t{i:02d}": torch.tensor([float("nan")]) for i in range(25)}, str(path))
    (problem,) = validate_safetensors(path).problems
    assert problem.startswith("25 tensors contain NaN or Inf: t00, t01,")
    assert problem.endswith("... (5 more)")


def test_big_file_header_only_is_fast(tmp_path):
    """A 3 GB (sparse) file validates without reading its data when check_values=False."""
    path = tmp_path / "big.safetensors"
    n = 3 * 1024**3 // 2
    header = json.dumps({"w": {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + 2 * n)
    info = validate_safetensors(path, check_values=False)
    assert info.n_params == n
    assert info.tensors["w"].end == 2 * n
