"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1 for offline tests.

It implements the endpoints the real ``huggingface_hub`` client (2.x) calls for what ``sau-hub`` does, with
the Hub's own response shapes and error headers (``X-Error-Code``), so the client raises its real typed errors:

    GET  /api/whoami-v2
    GET  /api/models/{repo}/auth-check[/write]
    GET  /api/models/{repo}[/revision/{rev}]        (?securityStatus=1, ?blobs=1)
    GET  /api/models/{repo}/tree/{rev}[/{path}]     (?recursive=1, ?expand=1 adds securityFileStatus)
    POST /api/models/{repo}/preupload/{rev}         (every file "regular": content travels inline, no LFS)
    POST /api/models/{repo}/commit/{rev}            (ndjson; parentCommit; ?create_pr=1 -> refs/pr/N)
    POST /api/repos/create
    POST /api/validate-yaml                         (YAML front matter parsed with yaml.safe_load)
    HEAD/GET /{repo}/resolve/{rev}/{path}            (Range, X-Repo-Commit, ETag / X-Linked-Etag)

Repos are git-like: every commit is an immutable {path: bytes} snapshot with a 40-hex id; refs map names
(``main``, ``refs/pr/1``) to commits. Tests seed repos with :meth:`HubState.add_repo`, inspect them with
:meth:`HubState.files`, and inject faults (a connection dropped mid-download, a rejected commit).
Nothing here runs repository code; it only stores bytes.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".png")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def front_matter(text: str) -> dict | None:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    data = yaml.safe_load(m.group(1))
    return data if isinstance(data, dict) else None


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool = False
    gated: bool | str = False
    granted: set = field(default_factory=set)  # users allowed through the gate
    commits: dict = field(default_factory=dict)  # sha -> {"files": {...}, "parent": sha|None, "message": str}
    refs: dict = field(default_factory=dict)  # "main", "refs/pr/1" -> sha
    security: dict = field(default_factory=dict)  # path -> securityFileStatus the Hub would report
    pr_count: int = 0


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.log: list[tuple[str, str, dict]] = []  # (method, path, selected headers)
        self.drop_after: dict[str, list[int]] = {}  # repo path -> remaining drops (bytes sent before dropping)
        self.reject_commits: dict[str, tuple[int, str]] = {}  # repo_id -> (status, message)
        self._n = 0

    # ------------------------------------------------------------------ seeding and inspection
    def _sha(self, seed: str) -> str:
        self._n += 1
        return hashlib.sha1(f"{seed}:{self._n}".encode()).hexdigest()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, *, private=False, gated=False,
                 granted=(), security: dict | None = None) -> str:
        if isinstance(files, Path):
            folder = files
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        with self.lock:
            repo = Repo(repo_id, repo_id.split("/")[0], private, gated, set(granted), security=dict(security or {}))
            sha = self._sha(repo_id)
            repo.commits[sha] = {"files": dict(files), "parent": None, "message": "initial commit"}
            repo.refs["main"] = sha
            self.repos[repo_id] = repo
            return sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.refs.get(rev, rev)]["files"])

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, dict]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass

    def log_message(self, fmt, *args):  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return self.state.tokens.get(auth[7:])
        return None

    def _send(self, status: int, body: bytes = b"", ctype="application/json", headers: dict | None = None,
              head=False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head=False):
        self._send(status, json.dumps(obj).encode(), headers=headers, head=head)

    def _error(self, status: int, code: str | None, message: str, head=False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _repo(self, repo_id: str, *, write=False, files=False, head=False) -> Repo | None:
        """The repo if this user may see it (and download files / write), else send the Hub's error."""
        user = self._user()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            self._error(401 if user is None else 404, "RepoNotFound", "Repository not found", head)
            return None
        if write and user != repo.owner:
            self._error(403, None, "You don't have the rights to create a commit on this repo", head)
            return None
        if files and repo.gated and user != repo.owner and user not in repo.granted:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.", head)
            return None
        return repo

    def _commit(self, repo: Repo, rev: str, head=False) -> str | None:
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    def _file_entry(self, repo: Repo, path: str, data: bytes, expand: bool) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        if expand:
            entry["securityFileStatus"] = repo.security.get(
                path, {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                       "pickleImportScan": None})
        return entry

    # ------------------------------------------------------------------ routing
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.split("/") if p != ""]
        self.state.log.append((method, unquote(url.path), {"Range": self.headers.get("Range")}))
        try:
            with self.state.lock:
                self._route(method, parts, query)
        except BrokenPipeError:
            pass

    def _route(self, method: str, parts: list[str], q: dict):
        head = method == "HEAD"
        if parts[:2] == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._json(200, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}})
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(self._body() or b"{}"))
        if parts[:3] == ["api", "repos", "delete"] and method == "DELETE":
            payload = json.loads(self._body() or b"{}")
            repo_id = f"{payload.get('organization') or self._user()}/{payload.get('name')}"
            repo = self._repo(repo_id, write=True)
            if repo is not None:
                del self.state.repos[repo_id]
                self._json(200, {})
            return None
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(self._body() or b"{}"))
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest:
                return self._model_info(repo_id, "main", q)
            if rest[0] == "revision" and len(rest) >= 2:
                return self._model_info(repo_id, "/".join(rest[1:]), q)
            if rest[0] == "auth-check":
                repo = self._repo(repo_id, write=rest[1:] == ["write"], files=True)
                return None if repo is None else self._json(200, {})
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), q)
            if rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]))
            if rest[0] == "commit" and method == "POST":
                return self._commit_post(repo_id, "/".join(rest[1:]), q)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        return self._error(404, None, f"no route for {method} {self.path}", head)

    # ------------------------------------------------------------------ endpoints
    def _model_info(self, repo_id: str, rev: str, q: dict):
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit(repo, rev)
        if sha is None:
            return
        files = repo.commits[sha]["files"]
        card = None
        if "README.md" in files:
            try:
                card = front_matter(files["README.md"].decode("utf-8"))
            except yaml.YAMLError:
                card = None
        info = {"id": repo_id, "author": repo.owner, "sha": sha, "private": repo.private, "gated": repo.gated,
                "disabled": False, "tags": list((card or {}).get("tags") or []),
                "library_name": "diffusers" if "model_index.json" in files else None,
                "siblings": [{"rfilename": p, **({"size": len(d), "blobId": git_blob_sha1(d)} if q.get("blobs") else {})}
                             for p, d in sorted(files.items())]}
        if card is not None:
            info["cardData"] = card
        if q.get("securityStatus"):
            issues = [{"path": p, "level": s.get("status"), "pickleImportScan": s.get("pickleImportScan"),
                       "virusScan": s.get("avScan")} for p, s in repo.security.items() if s.get("status") != "safe"]
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": issues}
        self._json(200, info)

    def _tree(self, repo_id: str, rev: str, path: str, q: dict):
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit(repo, rev)
        if sha is None:
            return
        files = repo.commits[sha]["files"]
        prefix = path.rstrip("/") + "/" if path else ""
        recursive = q.get("recursive") in ("1", "true", "True")
        expand = q.get("expand") in ("1", "true", "True")
        out, folders = [], set()
        for p, data in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            if "/" in rel:
                dirs = rel.split("/")[:-1]
                for i in range(1 if not recursive else len(dirs)):
                    folders.add(prefix + "/".join(dirs[: i + 1]))
                if not recursive:
                    continue
            out.append(self._file_entry(repo, p, data, expand))
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)]
        if path and not out and path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        self._json(200, out)

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool):
        repo = self._repo(repo_id, files=True, head=head)
        if repo is None:
            return
        sha = self._commit(repo, rev, head)
        if sha is None:
            return
        files = repo.commits[sha]["files"]
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", head)
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        if path.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= max(len(data), 1):
                return self._send(416, b"", "application/octet-stream", {"Content-Range": f"bytes */{len(data)}"}, head)
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        drops = self.state.drop_after.get(f"{repo_id}/{path}")
        bounded = bool(rng and re.fullmatch(r"bytes=\d+-\d+", rng.strip()))  # header probes are not dropped
        if not head and drops and not bounded and status in (200, 206) and len(body) > 1:
            cut = min(drops.pop(0), len(body) - 1)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                import socket

                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, body, "application/octet-stream", headers, head)

    def _create_repo(self, payload: dict):
        user = self._user()
        if user is None:
            return self._error(401, None, "Invalid credentials in Authorization header")
        owner = payload.get("organization") or user
        if owner != user:
            return self._error(403, None, f"You don't have the rights to create a model under {owner}")
        repo_id = f"{owner}/{payload['name']}"
        if repo_id in self.state.repos:
            return self._error(409, None, "You already created this model repo")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id, owner, private)
        sha = self.state._sha(repo_id)
        repo.commits[sha] = {"files": {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             "parent": None, "message": "initial commit"}
        repo.refs["main"] = sha
        self.state.repos[repo_id] = repo
        host = f"http://{self.headers.get('Host')}"
        self._json(200, {"url": f"{host}/{repo_id}", "name": repo_id, "id": sha})

    def _validate_yaml(self, payload: dict):
        try:
            data = front_matter(payload.get("content", ""))
        except yaml.YAMLError as exc:
            return self._error(400, None, f"Invalid metadata in README.md: {str(exc).splitlines()[0]}")
        warnings = []
        if data is None:
            warnings.append({"message": "empty or missing yaml metadata in repo card"})
        else:
            for key in ("license", "base_model_relation", "library_name", "pipeline_tag"):
                if key in data and not isinstance(data[key], str):
                    return self._error(400, None, f"Invalid metadata in README.md: \"{key}\" must be a string")
            if "base_model" in data and not isinstance(data["base_model"], (str, list)):
                return self._error(400, None, "Invalid metadata in README.md: \"base_model\" must be a string or list")
            if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
                return self._error(400, None, "Invalid metadata in README.md: \"tags\" must be a list of strings")
        self._json(200, {"errors": [], "warnings": warnings})

    def _preupload(self, repo_id: str, rev: str):
        repo = self._repo(repo_id, files=True)
        if repo is None:
            return
        payload = json.loads(self._body() or b"{}")
        sha = repo.refs.get(rev) or repo.refs["main"]
        files = repo.commits[sha]["files"]
        out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
               for f in payload.get("files", [])]
        self._json(200, {"files": out, "commitOid": sha})

    def _commit_post(self, repo_id: str, rev: str, q: dict):
        body = self._body()
        create_pr = q.get("create_pr") in ("1", "true")
        user = self._user()
        repo = self._repo(repo_id, files=True)  # a PR needs read access only
        if repo is None:
            return
        if not create_pr and user != repo.owner:
            return self._error(403, None, "You don't have the rights to create a commit on this repo; open a pull "
                               "request instead")
        if user is None:
            return self._error(401, None, "Invalid credentials in Authorization header")
        reject = self.state.reject_commits.get(repo_id)
        if reject:
            return self._error(reject[0], None, reject[1])
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        base = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if base is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        parent = header.get("parentCommit")
        if parent is not None:
            if parent not in repo.commits:
                return self._error(400, None, f"Invalid parent commit {parent}")
            if not create_pr and parent != base:
                return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            base = parent
        files = dict(repo.commits[base]["files"])
        for item in lines:
            key, v = item["key"], item["value"]
            if key == "file":
                files[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
            elif key == "deletedFile":
                files.pop(v["path"], None)
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(v["path"].rstrip("/") + "/")]:
                    del files[p]
            elif key == "lfsFile":
                return self._error(400, None, "LFS uploads are not supported by this test server")
        sha = self.state._sha(repo_id + header.get("summary", ""))
        repo.commits[sha] = {"files": files, "parent": base, "message": header.get("summary", "")}
        host = f"http://{self.headers.get('Host')}"
        out = {"commitUrl": f"{host}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        if create_pr:
            repo.pr_count += 1
            repo.refs[f"refs/pr/{repo.pr_count}"] = sha
            out["pullRequestUrl"] = f"{host}/{repo_id}/discussions/{repo.pr_count}"
        else:
            repo.refs[rev] = sha
        self._json(200, out)


class HubServer:
    """``with HubServer(tokens) as hub: hub.url, hub.state``; serves on an ephemeral 127.0.0.1 port."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
