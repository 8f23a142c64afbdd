"""File safety: the project's one validator for model weight files.

Only ``.safetensors`` files are ever read as weights. Every file is validated structurally before any tensor is
touched: the 8-byte header length is bounded, the header is a UTF-8 JSON object without duplicate keys, every
entry has a known dtype, a non-negative integer shape and two integer data offsets, dtype x shape equals the
byte span, and the spans tile the data section exactly (contiguous from 0, no overlap, no gap, nothing past
the end, no trailing bytes). ``__metadata__`` must map strings to strings.

Pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``, torch's zip format, or any of these renamed to
``.safetensors``) are recognised from their extension and magic bytes and refused with an explanation. Nothing
in this module unpickles anything: no ``pickle``, no ``torch.load``.

API (everything else in SAU calls these; adapters must not keep a second validator)::

    info = validate_safetensors(path, check_values=True)   # raises UnsafeFileError on any structural problem
    state_dict = load_safetensors(path)                     # validate, then safetensors.torch.load_file
    refuse_if_pickle(path)                                  # raises UnsafeFileError unless it may be safetensors

Every error message is one line, starts with the file name and says what is wrong in user terms.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import UnsafeFileError

PathLike = Union[str, "os.PathLike[str]"]

#: Largest header accepted, in bytes (the same bound the safetensors library itself uses).
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

# How to find NaN/Inf in each floating dtype from its raw bits: (little-endian unsigned view, mask, test).
# "all": (bits & mask) == mask (exponent all ones: Inf or NaN); "eq": bits == mask (the single NaN pattern).
_NONFINITE_BITS: dict[str, tuple[str, int, str]] = {
    "F16": ("<u2", 0x7C00, "all"),
    "BF16": ("<u2", 0x7F80, "all"),
    "F32": ("<u4", 0x7F800000, "all"),
    "F64": ("<u8", 0x7FF0000000000000, "all"),
    "C64": ("<u4", 0x7F800000, "all"),  # two float32 per element
    "F8_E5M2": ("u1", 0x7C, "all"),
    "F8_E4M3": ("u1", 0x7F, "all"),  # e4m3fn: no Inf, NaN is S.1111.111
    "F8_E5M2FNUZ": ("u1", 0x80, "eq"),  # fnuz: the only NaN is the "negative zero" pattern
    "F8_E4M3FNUZ": ("u1", 0x80, "eq"),
    "F8_E8M0": ("u1", 0xFF, "eq"),
}

_SCAN_CHUNK_BYTES = 64 * 1024 * 1024
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_MAX_NAMES_LISTED = 20

_CONVERT_ADVICE = (
    "SAU never unpickles files because a pickle can run code. Convert it to .safetensors in an isolated "
    "environment you trust (e.g. a throwaway container or VM with no credentials or network: load it with "
    "torch.load and save the state dict with safetensors.torch.save_file) or download the .safetensors version"
)

# Extensions that are pickles by convention, and what to call them when the content says nothing more.
_PICKLE_EXTENSIONS: dict[str, str] = {
    ".ckpt": "a PyTorch pickle checkpoint",
    ".pt": "a PyTorch pickle file",
    ".pth": "a PyTorch pickle file",
    ".bin": "a PyTorch pickle weights file (like pytorch_model.bin)",
    ".pkl": "a Python pickle",
    ".pickle": "a Python pickle",
    ".joblib": "a joblib pickle",
}
_TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")

# torch.save's legacy (pre-zip) format: protocol-2 pickle of this magic number first.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it. ``start``/``end`` are byte offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsInfo:
    """What validation learned about a file. ``problems`` are non-fatal findings (NaN/Inf, no tensors)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    header_size: int
    file_size: int
    problems: list[str] = field(default_factory=list)
    #: tensor name -> number of NaN/Inf values (filled only when check_values=True)
    nonfinite: dict[str, int] = field(default_factory=dict)
    values_checked: bool = False

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def data_offset(self) -> int:
        """Absolute file offset of the data section (8 + header size)."""
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


# --------------------------------------------------------------------------------------------------------------
# Message helpers


def _oneline(text: str) -> str:
    """Escape anything that could break a one-line message or hide text (newlines, bidi, zero-width)."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _q(name: str, limit: int = 80) -> str:
    text = _oneline(name)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"'{text}'"


def _label(path: Path, name: str | None) -> str:
    return _oneline(name if name is not None else str(path))


def _human(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"  # pragma: no cover


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------------------------------------------
# Sniffing: what is this file, from its extension and first bytes? Reads at most a zip directory; never unpickles.


@dataclass(frozen=True)
class _Kind:
    description: str  # "a Python pickle (protocol 4)"
    is_pickle: bool
    hint: str = ""


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if size < 10 or len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{"


def _zip_kind(path: Path) -> _Kind:
    try:
        with zipfile.ZipFile(path) as zf:  # reads the central directory only
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return _Kind("a damaged zip archive (possibly a PyTorch zip-format checkpoint, which holds a pickle)", True)
    pickles = [n for n in names if n.endswith(".pkl")]
    torch_pickle = next((n for n in pickles if n == "data.pkl" or n.endswith("/data.pkl")), None)
    if torch_pickle is not None:
        return _Kind(f"a PyTorch checkpoint in torch's zip format (it holds {_q(torch_pickle)}, a pickle)", True)
    if pickles:
        return _Kind(f"a zip archive that holds a pickle ({_q(pickles[0])})", True)
    return _Kind("a zip archive", False)


def _sniff(path: Path, head: bytes, size: int) -> _Kind | None:
    """Identify a non-safetensors file from magic bytes; None if it may be safetensors (or is unrecognised)."""
    if _looks_like_safetensors(head, size):
        return None
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return _Kind("a PyTorch checkpoint in torch's legacy format (a pickle)", True)
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return _Kind(f"a Python pickle (protocol {head[1]})", True)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return _zip_kind(path)
    if head.startswith(b"version https://git-lfs"):
        return _Kind("a Git LFS pointer file, not the weights themselves", False,
                     " (fetch the real file with `git lfs pull` or download it from the Hub)")
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return _Kind("an HTML/XML page", False, " (a failed or login-protected download?)")
    if head.startswith(b"GGUF"):
        return _Kind("a GGUF file", False)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return _Kind("an HDF5 file (e.g. Keras .h5)", False)
    if head.startswith(b"\x1f\x8b"):
        return _Kind("a gzip-compressed file", False)
    if head.startswith(b"\x93NUMPY"):
        return _Kind("a NumPy .npy array", False)
    return None


def _open_checked(path: Path, label: str):
    """Open ``path`` for binary reading after checking it exists and is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafeFileError(f"{label} does not exist") from None
    except PermissionError:
        raise UnsafeFileError(f"{label} cannot be read: permission denied") from None
    except OSError as exc:
        raise UnsafeFileError(f"{label} cannot be read: {_oneline(exc.strerror or str(exc))}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeFileError(f"{label} is a directory, not a .safetensors file")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{label} is not a regular file (device, pipe or socket), not a .safetensors file")
    try:
        return open(path, "rb")
    except PermissionError:
        raise UnsafeFileError(f"{label} cannot be read: permission denied") from None
    except OSError as exc:
        raise UnsafeFileError(f"{label} cannot be read: {_oneline(exc.strerror or str(exc))}") from None


def _refuse(path: Path, label: str, head: bytes, size: int) -> None:
    ext = path.suffix.lower()
    kind = _sniff(path, head, size)
    if ext == ".safetensors":
        if kind is None:
            return
        if kind.is_pickle:
            raise UnsafeFileError(f"{label} is {kind.description} renamed to .safetensors; {_CONVERT_ADVICE}")
        raise UnsafeFileError(f"{label} is not a safetensors file: it is {kind.description}{kind.hint}")

    ext_text = f"'{_oneline(path.suffix)}' extension" if path.suffix else "no extension"
    if kind is not None and kind.is_pickle:
        if ext in _TORCH_EXTENSIONS and "PyTorch" not in kind.description:
            description = _PICKLE_EXTENSIONS[ext]  # a raw pickle named .ckpt/.pt/.bin: call it what users call it
        else:
            description = kind.description
        raise UnsafeFileError(f"{label} is {description}; {_CONVERT_ADVICE}")
    if kind is None and ext in _PICKLE_EXTENSIONS:
        if _looks_like_safetensors(head, size):
            raise UnsafeFileError(
                f"{label} has a {ext_text} but its content looks like safetensors; SAU only reads weights from "
                f".safetensors files: if it came from a source you trust, rename it to {_oneline(path.stem)}.safetensors"
            )
        raise UnsafeFileError(f"{label} is {_PICKLE_EXTENSIONS[ext]}; {_CONVERT_ADVICE}")
    if kind is None and _looks_like_safetensors(head, size):
        raise UnsafeFileError(
            f"{label} has {ext_text} but its content looks like safetensors; SAU only reads weights from "
            f".safetensors files: rename it to {_oneline(path.stem)}.safetensors"
        )
    what = f" (it is {kind.description}{kind.hint})" if kind is not None else ""
    raise UnsafeFileError(
        f"{label} is not a .safetensors file{what}; SAU only reads model weights from .safetensors files"
    )


def refuse_if_pickle(path: PathLike, *, name: str | None = None) -> None:
    """Raise UnsafeFileError explaining what the file is unless it may be a safetensors file.

    Refuses: missing files, directories, empty files, anything without the ``.safetensors`` extension, and
    pickles / torch zip checkpoints / other known formats whatever their extension. Reads a few bytes (and, for
    a zip, its directory); never unpickles. Returning means "go on and validate", not "safe".
    ``name`` replaces the path at the start of messages (e.g. a repo-relative name).
    """
    p = Path(path)
    label = _label(p, name)
    with _open_checked(p, label) as fh:
        _read_head_or_refuse(fh, p, label)


def _read_head_or_refuse(fh, p: Path, label: str) -> tuple[int, bytes]:
    """File size and first 64 bytes of an open file; refuses empty files, pickles and other formats."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(64)
    if size == 0:
        raise UnsafeFileError(f"{label} is empty (0 bytes); a .safetensors file has at least a header")
    _refuse(p, label, head, size)
    return size, head


# --------------------------------------------------------------------------------------------------------------
# Structural validation


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null", int: "number", float: "number",
            dict: "object"}.get(type(value), type(value).__name__)


def _parse_header(raw: bytes, label: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(
            f"{label} has a header that is not valid UTF-8 (bad byte at header offset {exc.start}); "
            "not a safetensors file or corrupt"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise UnsafeFileError(
            f"{label} has a header with duplicate key {_q(exc.key)}; readers disagree on which copy wins, so the "
            "file is ambiguous (corrupt or hostile)"
        ) from None
    except json.JSONDecodeError as exc:
        raise UnsafeFileError(
            f"{label} has a header that is not valid JSON ({_oneline(exc.msg)} at character {exc.pos}); "
            "not a safetensors file or corrupt"
        ) from None
    except RecursionError:
        raise UnsafeFileError(f"{label} has a header whose JSON is nested too deeply (corrupt or hostile)") from None
    except ValueError as exc:
        raise UnsafeFileError(f"{label} has a header that is not valid JSON ({_oneline(str(exc))})") from None
    if not isinstance(header, dict):
        raise UnsafeFileError(
            f"{label} has a header that is a JSON {_json_type(header)}, not an object mapping tensor names to "
            "entries; not a safetensors file"
        )
    if not raw.startswith(b"{"):
        raise UnsafeFileError(f"{label} has a header that does not start with '{{' (leading whitespace or padding)")
    return header


def _parse_metadata(value: Any, label: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise UnsafeFileError(
            f"{label} has __metadata__ that is a JSON {_json_type(value)}; it must be an object of string values"
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise UnsafeFileError(
                f"{label} has __metadata__ entry {_q(key)} whose value is a JSON {_json_type(item)}; "
                "metadata values must be strings"
            )
    return dict(value)


def _parse_entry(tname: str, value: Any, label: str, data_size: int) -> TensorEntry:
    t = _q(tname)
    if not isinstance(value, dict):
        raise UnsafeFileError(
            f"{label}: tensor {t} is described by a JSON {_json_type(value)}, not an object with dtype, shape "
            "and data_offsets"
        )
    for key in value:
        if key not in _ENTRY_FIELDS:
            raise UnsafeFileError(
                f"{label}: tensor {t} has unexpected field {_q(key)}; only dtype, shape and data_offsets are allowed"
            )
    for key in _ENTRY_FIELDS:
        if key not in value:
            raise UnsafeFileError(f"{label}: tensor {t} is missing its '{key}' field")

    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown = _q(dtype) if isinstance(dtype, str) else f"a JSON {_json_type(dtype)}"
        raise UnsafeFileError(
            f"{label}: tensor {t} has unknown dtype {shown}; known dtypes are {', '.join(DTYPE_BITS)}"
        )

    shape = value["shape"]
    if not isinstance(shape, list):
        raise UnsafeFileError(f"{label}: tensor {t} has a shape that is a JSON {_json_type(shape)}, not a list")
    for dim in shape:
        if not _is_int(dim):
            raise UnsafeFileError(
                f"{label}: tensor {t} has shape {_oneline(json.dumps(shape))[:80]} with a non-integer dimension"
            )
        if dim < 0:
            raise UnsafeFileError(
                f"{label}: tensor {t} has shape {_oneline(json.dumps(shape))[:80]} with a negative dimension"
            )

    offsets = value["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise UnsafeFileError(
            f"{label}: tensor {t} has data_offsets {_oneline(json.dumps(offsets))[:80]}; they must be two integers "
            "[start, end]"
        )
    start, end = offsets
    if start < 0 or end < 0:
        raise UnsafeFileError(f"{label}: tensor {t} has negative data_offsets [{start}, {end}]")
    if end < start:
        raise UnsafeFileError(f"{label}: tensor {t} has data_offsets [{start}, {end}] that end before they start")
    if end > data_size:
        raise UnsafeFileError(
            f"{label}: tensor {t} has data_offsets [{start}, {end}] beyond the end of the file (the data section "
            f"has only {data_size} bytes); the file is truncated or corrupt"
        )

    numel = math.prod(shape)
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise UnsafeFileError(
            f"{label}: tensor {t} has {numel} elements of {dtype}, which do not fill a whole number of bytes"
        )
    if bits // 8 != end - start:
        raise UnsafeFileError(
            f"{label}: tensor {t} should take {bits // 8} bytes ({dtype} x shape {list(shape)}) but its "
            f"data_offsets span {end - start} bytes (dtype x shape mismatch)"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _check_layout(tensors: dict[str, TensorEntry], data_size: int, label: str) -> None:
    ordered = sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end))
    position = 0
    previous: tuple[str, TensorEntry] | None = None
    for tname, entry in ordered:
        if entry.start > position:
            gap = entry.start - position
            if previous is None:
                raise UnsafeFileError(
                    f"{label} has {_plural(gap, 'unused byte')} before the first tensor {_q(tname)} (data offsets "
                    f"0-{entry.start}); tensor data must be contiguous with no gaps"
                )
            raise UnsafeFileError(
                f"{label} has a gap of {_plural(gap, 'unused byte')} between tensors {_q(previous[0])} and "
                f"{_q(tname)} (data offsets {position}-{entry.start}); tensor data must be contiguous with no gaps"
            )
        if entry.start < position:
            assert previous is not None
            prev_name, prev = previous
            raise UnsafeFileError(
                f"{label} has overlapping tensors {_q(prev_name)} (data offsets {prev.start}-{prev.end}) and "
                f"{_q(tname)} (data offsets {entry.start}-{entry.end}); each byte must belong to one tensor"
            )
        position = entry.end
        previous = (tname, entry)
    if position != data_size:
        extra = data_size - position
        where = "the last tensor" if tensors else "the header (the file has no tensors)"
        raise UnsafeFileError(
            f"{label} has {_plural(extra, 'trailing byte')} after {where}; a safetensors file must end where its "
            "tensor data ends (appended or hidden data)"
        )


def _scan_values(path: Path, info: SafetensorsInfo, label: str) -> None:
    """Count NaN/Inf per floating tensor from raw bits, memory-mapped and in chunks (multi-GB files are fine)."""
    import numpy as np

    candidates = [(n, e) for n, e in info.tensors.items() if e.dtype in _NONFINITE_BITS and e.nbytes > 0]
    info.values_checked = True
    if not candidates:
        return
    base = info.data_offset
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != info.file_size:
            raise UnsafeFileError(f"{label} changed size while it was being validated")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for tname, entry in candidates:
                view, mask_int, test = _NONFINITE_BITS[entry.dtype]
                dt = np.dtype(view)
                mask = dt.type(mask_int)
                step = max(dt.itemsize, _SCAN_CHUNK_BYTES - _SCAN_CHUNK_BYTES % dt.itemsize)
                count = 0
                for offset in range(entry.start, entry.end, step):
                    nbytes = min(step, entry.end - offset)
                    chunk = np.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize, offset=base + offset)
                    if test == "all":
                        count += int(np.count_nonzero((chunk & mask) == mask))
                    else:
                        count += int(np.count_nonzero(chunk == mask))
                    del chunk
                if count:
                    info.nonfinite[tname] = count
        finally:
            try:
                mm.close()
            except BufferError:  # pragma: no cover - a view is still alive; let the GC close it
                pass
    if info.nonfinite:
        names = sorted(info.nonfinite)
        shown = ", ".join(_oneline(n) for n in names[:_MAX_NAMES_LISTED])
        if len(names) > _MAX_NAMES_LISTED:
            shown += f", ... ({len(names) - _MAX_NAMES_LISTED} more)"
        verb = "contains" if len(names) == 1 else "contain"
        info.problems.append(f"{_plural(len(names), 'tensor')} {verb} NaN or Inf: {shown}")


def validate_safetensors(path: PathLike, check_values: bool = True, *, name: str | None = None) -> SafetensorsInfo:
    """Validate a .safetensors file's structure (and optionally scan float values for NaN/Inf).

    Raises UnsafeFileError (one line, starting with the file name) on anything structurally wrong, and for
    pickles or any non-.safetensors file. Reads only the header, plus a memory-mapped chunked pass over float
    tensors when ``check_values`` is true; non-finite values are reported in ``info.problems``, not raised.
    ``name`` replaces the path at the start of messages.
    """
    p = Path(path)
    label = _label(p, name)
    with _open_checked(p, label) as fh:
        size, head = _read_head_or_refuse(fh, p, label)
        if size < 8:
            raise UnsafeFileError(
                f"{label} is truncated: it has {_plural(size, 'byte')}, fewer than the 8-byte header length field"
            )
        header_size = int.from_bytes(head[:8], "little")
        if header_size > MAX_HEADER_BYTES:
            raise UnsafeFileError(
                f"{label} declares a header of {_human(header_size)}, over the {_human(MAX_HEADER_BYTES)} limit "
                "(header bomb); the file is corrupt or hostile"
            )
        if header_size > size - 8:
            raise UnsafeFileError(
                f"{label} is truncated or not a safetensors file: its header length says {header_size} bytes but "
                f"only {size - 8} bytes follow the length field"
            )
        if header_size < 2:
            raise UnsafeFileError(
                f"{label} has an empty header (length {header_size}); not a safetensors file or corrupt"
            )
        fh.seek(8)
        raw = fh.read(header_size)
        if len(raw) != header_size:
            raise UnsafeFileError(f"{label} is truncated: the header ends early")

    header = _parse_header(raw, label)
    data_size = size - 8 - header_size
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for key, value in header.items():
        if key == "__metadata__":
            metadata = _parse_metadata(value, label)
        else:
            tensors[key] = _parse_entry(key, value, label, data_size)
    _check_layout(tensors, data_size, label)

    info = SafetensorsInfo(path=p, metadata=metadata, tensors=tensors, header_size=header_size, file_size=size)
    if not tensors:
        info.problems.append("the file contains no tensors")
    if check_values:
        _scan_values(p, info, label)
    return info


def load_safetensors(
    path: PathLike, *, device: str = "cpu", check_values: bool = False, name: str | None = None
) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Validate, then load every tensor with ``safetensors.torch.load_file``. Never unpickles.

    The NaN/Inf scan is off by default here (it costs a pass over the data); call validate_safetensors when
    the findings are wanted.
    """
    from safetensors.torch import load_file

    p = Path(path)
    label = _label(p, name)
    validate_safetensors(p, check_values=check_values, name=name)
    try:
        return load_file(str(p), device=device)
    except Exception as exc:  # SafetensorError, unsupported dtype in this torch, I/O errors
        first_line = _oneline(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UnsafeFileError(f"{label} passed validation but could not be loaded: {first_line}") from None
