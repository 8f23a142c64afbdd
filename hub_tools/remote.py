"""Reading a model from the Hub: resolve a pinned commit, plan the download, pre-check headers by range
requests, download with the real client and check what arrived.

Only the files the model needs are downloaded. Code (``.py``) is never downloaded, let alone run; pickles are
never downloaded for loading (a repo that only has pickles is refused with an explanation)."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sau_core.errors import UnsafeFileError

from .errors import HubError, NoSafetensors, hub_errors

DEFAULT_ENDPOINT = "https://huggingface.co"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".ipynb")
#: weight-carrying components of a diffusers pipeline that SAU loads (feature_extractor/safety_checker are not)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CONFIG_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2")
#: Bytes read by the first range request: the 8-byte length plus most headers of real checkpoints.
HEAD_PROBE_BYTES = 256 * 1024
#: The largest header sau-hub fetches by range request before downloading (the bound huggingface_hub's own
#: safetensors parser uses); larger ones are refused as "huge metadata" before any weight is downloaded.
HUB_MAX_HEADER_BYTES = 25_000_000
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None  # None: the default branch

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_ref(text: str) -> RepoRef:
    repo, _, rev = text.partition("@")
    if text.startswith(("http://", "https://")):
        raise HubError(f"give the model as ORG/MODEL[@REVISION], not a URL ({text!r})")
    if not _REPO_RE.match(repo) or ".." in repo:
        raise HubError(f"{text!r} is not a Hub model id: expected ORG/MODEL[@REVISION]")
    if "@" in text and not rev:
        raise HubError(f"{text!r}: empty revision after '@'")
    return RepoRef(repo, rev or None)


def endpoint_from_env() -> str:
    """HF_ENDPOINT read at call time (huggingface_hub reads it once at import), without a trailing slash."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def find_token() -> str | None:
    """The token from the usual places (HF_TOKEN, then the token file). Never printed or written anywhere."""
    from huggingface_hub import get_token

    return get_token()


@dataclass
class Hub:
    endpoint: str
    token: str | None

    @classmethod
    def from_env(cls) -> "Hub":
        return cls(endpoint_from_env(), find_token())

    def api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token if self.token else False)

    def redact(self, text: str) -> str:
        """Defence in depth: the token never appears in anything we print or write."""
        if self.token and self.token in text:
            text = text.replace(self.token, "***")
        return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files only
    security: dict | None  # the Hub's securityFileStatus, verbatim

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix.lower()


@dataclass
class Resolved:
    ref: RepoRef
    sha: str
    info: object  # huggingface_hub ModelInfo
    files: dict[str, RemoteFile]
    security_repo_status: dict | None

    @property
    def card_data(self) -> dict:
        cd = getattr(self.info, "card_data", None)
        if cd is None:
            return {}
        return cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)

    @property
    def gated(self) -> bool:
        return bool(getattr(self.info, "gated", False))

    @property
    def private(self) -> bool:
        return bool(getattr(self.info, "private", False))


def resolve(hub: Hub, ref: RepoRef) -> Resolved:
    """auth_check -> model_info(revision, securityStatus=True) -> the tree at the pinned sha (expand: per-file
    security status)."""
    from huggingface_hub.hf_api import RepoFile

    api = hub.api()
    with hub_errors(ref.repo_id, ref.revision, endpoint=hub.endpoint):
        api.auth_check(ref.repo_id)
        info = api.model_info(ref.repo_id, revision=ref.revision, securityStatus=True)
        sha = info.sha
        if not sha or not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise HubError(f"{ref}: the Hub returned no commit sha for this revision")
        files = {}
        for f in api.list_repo_tree(ref.repo_id, revision=sha, recursive=True, expand=True):
            if isinstance(f, RepoFile):
                sec = None
                if f.security is not None:
                    sec = {"status": f.security.status, "avScan": f.security.av_scan,
                           "pickleImportScan": f.security.pickle_import_scan}
                files[f.path] = RemoteFile(f.path, int(f.size or 0), f.lfs.sha256 if f.lfs else None, sec)
    return Resolved(ref, sha, info, files, getattr(info, "security_repo_status", None))


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class Plan:
    layout: str  # "diffusers" | "single-file"
    download: list[str]  # repo paths to download
    weights: list[str]  # the .safetensors among them (range pre-checked, validated)
    ignored: dict[str, str] = field(default_factory=dict)  # path -> why it is not downloaded


def _folder(path: str) -> str:
    parent = str(PurePosixPath(path).parent)
    return "" if parent == "." else parent


def _component_weights(files: dict[str, RemoteFile], comp: str) -> list[str]:
    """Mirror of sau_core.model_io's choice of weight files for one component folder."""
    in_dir = {PurePosixPath(p).name: p for p in files if _folder(p) == comp}
    base = "model" if comp.startswith("text_encoder") else "diffusion_pytorch_model"
    for name in (f"{base}.safetensors", f"{base}.fp16.safetensors"):
        if name in in_dir:
            return [in_dir[name]]
    for name in (f"{base}.safetensors.index.json", f"{base}.fp16.safetensors.index.json"):
        if name in in_dir:
            return [in_dir[name]] + sorted(p for n, p in in_dir.items() if n.endswith(".safetensors"))
    st = sorted(p for n, p in in_dir.items() if n.endswith(".safetensors"))
    if st:
        return st
    pickles = sorted(p for n, p in in_dir.items() if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise NoSafetensors(
            f"{comp}/ has only pickled weights ({', '.join(PurePosixPath(p).name for p in pickles)}); SAU never "
            "unpickles files because a pickle can run code: ask the author for .safetensors weights, or convert "
            "them yourself in an isolated environment (torch.load + safetensors.torch.save_file) and upload those")
    raise HubError(f"{comp}/ has no weights")


def plan_download(resolved: Resolved, index: dict | None, single_file: str | None = None) -> Plan:
    """Which files to fetch. ``index``: the repo's model_index.json (None when there is none)."""
    files = resolved.files
    ignored: dict[str, str] = {}
    for p in files:
        if p.lower().endswith(CODE_SUFFIXES):
            ignored[p] = "code: never downloaded or run"
    if index is not None and single_file is None:
        want = {"model_index.json"}
        weights: list[str] = []
        comps = [c for c in COMPONENTS if isinstance(index.get(c), list) and index[c][1] is not None]
        for comp in comps:
            chosen = _component_weights(files, comp)
            want.update(chosen)
            weights += [p for p in chosen if p.endswith(".safetensors")]
            want.update(p for p in files if _folder(p) == comp and p.endswith(".json") and "index" not in p)
        for folder in CONFIG_FOLDERS:
            want.update(p for p in files if _folder(p) == folder and p.endswith((".json", ".txt")))
        want.update(p for p in files if "/" not in p and p.lower().startswith(("license", "licence"))
                    and not p.lower().endswith(CODE_SUFFIXES + PICKLE_SUFFIXES))
        if "organism.json" in files:  # SAU's own organism spec (data only): lets eval/resolve name the backdoor
            want.add("organism.json")
        layout = "diffusers"
    else:
        top = sorted(p for p in files if "/" not in p)
        if single_file is not None:
            if single_file not in files:
                raise HubError(f"{resolved.ref}: no file {single_file!r} at {resolved.sha[:12]}")
            candidates = [single_file]
        else:
            candidates = [p for p in top if p.endswith(".safetensors")]
        if not candidates:
            pickles = [p for p in files if p.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise NoSafetensors(
                    f"{resolved.ref} has no .safetensors weights, only pickles ({', '.join(sorted(pickles)[:4])}); SAU "
                    "never unpickles files because a pickle can run code: ask the author for a .safetensors version, "
                    "or convert it yourself in an isolated environment (torch.load + safetensors.torch.save_file)")
            raise NoSafetensors(f"{resolved.ref} has neither model_index.json nor a .safetensors checkpoint")
        if len(candidates) > 1:
            raise HubError(f"{resolved.ref} has several checkpoints ({', '.join(candidates[:6])}): choose one with "
                           "--file NAME")
        if not candidates[0].endswith(".safetensors"):
            raise NoSafetensors(f"{candidates[0]} is not a .safetensors file; SAU only reads weights from .safetensors")
        want, weights, layout = {candidates[0]}, [candidates[0]], "single-file"
    for p in files:
        if p not in want and p not in ignored:
            ignored[p] = "pickle: never loaded" if p.lower().endswith(PICKLE_SUFFIXES) else "not needed"
    return Plan(layout, sorted(want), sorted(weights), ignored)


# ------------------------------------------------------------------------------------------------ range pre-check


def _range_get(hub: Hub, url: str, start: int, end: int) -> bytes:
    """Bytes [start, end] of a file through huggingface_hub's own HTTP session (follows the Hub's redirects)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=hub.token if hub.token else False)
    headers["Range"] = f"bytes={start}-{end}"
    want = end - start + 1
    with get_session().stream("GET", url, headers=headers) as resp:
        hf_raise_for_status(resp)
        out = bytearray()
        for chunk in resp.iter_bytes():
            out += chunk
            if len(out) >= want:  # a server that ignores Range sends everything: stop reading
                break
    if resp.status_code == 200 and start > 0:
        raise HubError(f"{url}: the server ignored the Range request")
    return bytes(out[:want])


def validate_header_bytes(name: str, head: bytes, file_size: int):
    """Run sau_core's validator on a file of which only the first ``len(head)`` bytes are known.

    The bytes go into a sparse temporary file of the real size (no data is written past ``head``), so
    ``validate_safetensors(check_values=False)`` -- which reads only the header -- sees the true length, header
    and layout. The one validator stays in sau_core (engine request: a public header-bytes entry point)."""
    from sau_core.safety import validate_safetensors

    fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix=".sau-hub-head.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(head)
            fh.truncate(file_size)
        return validate_safetensors(tmp, check_values=False, name=name)
    finally:
        os.unlink(tmp)


def precheck_headers(hub: Hub, resolved: Resolved, paths: list[str]) -> dict[str, dict]:
    """Fetch each safetensors header by range request and validate it before anything is downloaded.
    Returns path -> {tensors, header_bytes, metadata_keys}; raises UnsafeFileError naming the repo file."""
    from huggingface_hub import hf_hub_url

    out = {}
    for path in paths:
        rf = resolved.files[path]
        name = f"{resolved.ref.repo_id}/{path}"
        url = hf_hub_url(resolved.ref.repo_id, path, revision=resolved.sha, endpoint=hub.endpoint)
        with hub_errors(resolved.ref.repo_id, resolved.sha, endpoint=hub.endpoint):
            head = _range_get(hub, url, 0, min(rf.size, HEAD_PROBE_BYTES) - 1) if rf.size > 0 else b""
            if len(head) >= 8:
                n = int.from_bytes(head[:8], "little")
                if HEAD_PROBE_BYTES - 8 < n <= HUB_MAX_HEADER_BYTES and n + 8 <= rf.size:
                    head += _range_get(hub, url, len(head), n + 8 - 1)
                elif HUB_MAX_HEADER_BYTES < n <= rf.size - 8 and head[8:9] == b"{":
                    raise UnsafeFileError(
                        f"{name} declares a header of {n} bytes, over the {HUB_MAX_HEADER_BYTES} bytes sau-hub reads "
                        "before downloading (huge metadata); the file is hostile or broken, so nothing was downloaded")
        info = validate_header_bytes(name, head, rf.size)
        out[path] = {"tensors": len(info.tensors), "header_bytes": info.header_size,
                     "metadata_keys": sorted(info.metadata)[:20]}
    return out


# ------------------------------------------------------------------------------------------------ download


def _literal_pattern(path: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", path)


def fetch_index(hub: Hub, resolved: Resolved, cache_dir: Path) -> dict | None:
    if "model_index.json" not in resolved.files:
        return None
    from huggingface_hub import hf_hub_download

    with hub_errors(resolved.ref.repo_id, resolved.sha, endpoint=hub.endpoint):
        p = hf_hub_download(resolved.ref.repo_id, "model_index.json", revision=resolved.sha, endpoint=hub.endpoint,
                            token=hub.token if hub.token else False, cache_dir=str(cache_dir))
    try:
        data = json.loads(Path(p).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HubError(f"{resolved.ref.repo_id}/model_index.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HubError(f"{resolved.ref.repo_id}/model_index.json is not a JSON object")
    return data


def download(hub: Hub, resolved: Resolved, plan: Plan, cache_dir: Path) -> Path:
    """snapshot_download of exactly the planned files at the pinned sha; an interrupted download resumes
    from the partial files kept in ``cache_dir`` on the next run. LFS files are checked against the sha256
    the Hub lists for them."""
    from huggingface_hub import snapshot_download

    with hub_errors(resolved.ref.repo_id, resolved.sha, endpoint=hub.endpoint):
        folder = Path(snapshot_download(
            resolved.ref.repo_id, revision=resolved.sha, endpoint=hub.endpoint,
            token=hub.token if hub.token else False, cache_dir=str(cache_dir),
            allow_patterns=[_literal_pattern(p) for p in plan.download], max_workers=4))
    for path in plan.download:
        local = folder / path
        if not local.is_file():
            raise HubError(f"{resolved.ref.repo_id}/{path} was not downloaded")
        rf = resolved.files[path]
        if rf.sha256 is not None and sha256_file(local) != rf.sha256:
            local.unlink()
            raise HubError(f"{resolved.ref.repo_id}/{path} does not match the sha256 the Hub lists for it "
                           "(corrupt download or changed upstream); it was removed, retry")
    return folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)
