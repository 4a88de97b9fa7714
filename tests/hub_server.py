"""A loopback stand-in for the Hugging Face Hub, for tests of pushing and downloading with the real client.

It implements the part of the Hub API that `huggingface_hub` calls to create a repository, push one commit
(small files inline, large/binary files through the Git LFS batch protocol, as the real Hub decides) and
download a snapshot: whoami, repo creation, YAML validation, preupload, LFS batch/upload/verify, commit,
branch creation, repo info, tree listing and `resolve` (HEAD and GET).

Every commit is recorded (`HubStandIn.commits`) with the exact files it holds, so a test asserts what a push
sent. Point the client at it with `HubStandIn.client_env()` (HF_ENDPOINT, HF_TOKEN, HF_HOME, no Xet) in a
subprocess: `huggingface_hub` reads HF_ENDPOINT once, at import.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
TOKEN = "hf_standin_write_token"
# What the Hub stores in LFS for a new model repo (its default .gitattributes), plus anything above 10 MB.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.h5", "*.png", "*.jpg", "*.zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        # The Hub's ETag is the sha256 for LFS files and the git blob id for the others.
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_oid(self.data)


@dataclass
class RecordedCommit:
    repo_id: str
    revision: str
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # path in repo -> bytes, as sent by this commit (deletions excluded)
    lfs_paths: list[str]  # which of them came through LFS
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    trees: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # commit oid -> files

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.trees else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubStandIn:
    """The server and its state; `start()` serves on 127.0.0.1 on a free port from a daemon thread."""

    def __init__(self, token: str = TOKEN, user: str = USER):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.commits: list[RecordedCommit] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes, uploaded through the LFS protocol
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._announced: set[str] = set()  # LFS oids the batch endpoint handed out an upload URL for
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> HubStandIn:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, hf_home: str | Path, token: str | None = TOKEN) -> dict[str, str]:
        """Environment for a `huggingface_hub` client process talking to this server (no token: logged out)."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # -- state helpers ---------------------------------------------------------------------------------------
    def repo(self, repo_id: str) -> Repo:
        found = self.repos.get(repo_id)
        if found is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return found

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: stored.data for path, stored in repo.trees[repo.resolve(revision)].items()}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every response sets Content-Length

    def log_message(self, *args) -> None:  # quiet: tests assert on recorded state instead
        pass

    # -- plumbing --------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.hub.requests.append((method, unquote(url.path)))
        try:
            body = self._read_body()
            routed = "GET" if method == "HEAD" else method  # HEAD answers GET's headers without the body
            for route_method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, url.path) if route_method == routed else None
                if match:
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    with self.hub._lock:
                        handler(self, body=body, **args)
                    return
            raise HubError(404, f"no route for {method} {url.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json({"error": error.message}, status=error.status, headers=headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None, length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _require_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise HubError(401, "You must be authenticated to access this resource")
        if auth.removeprefix("Bearer ") != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _readable_repo(self, repo_id: str) -> Repo:
        repo = self.hub.repo(repo_id)
        if repo.private:
            try:
                self._require_token()
            except HubError:
                # The Hub hides private repositories from anonymous users behind a "not found".
                raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound") from None
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- account and repositories ------------------------------------------------------------------------------
    def whoami(self, body: bytes) -> None:
        self._require_token()
        self._send_json(
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": "Stand-in Tester",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    def create_repo(self, body: bytes) -> None:
        self._require_token()
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "this stand-in only hosts model repositories")
        namespace = payload.get("organization") or self.hub.user
        if namespace != self.hub.user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            self._send_json({"error": "You already created this model repo", "url": url}, status=409)
            return
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        initial = _new_oid(repo_id, "initial")
        gitattributes = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
        repo.trees[initial] = {".gitattributes": StoredFile(gitattributes.encode(), lfs=False)}
        repo.branches["main"] = initial
        self.hub.repos[repo_id] = repo
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        errors = _card_metadata_errors(content)
        self._send_json({"errors": [{"message": e} for e in errors], "warnings": []}, status=400 if errors else 200)

    def create_branch(self, body: bytes, repo: str, branch: str) -> None:
        self._require_token()
        found = self.hub.repo(repo)
        if branch in found.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", branch) or branch.startswith("refs/"):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        starting_point = (json.loads(body) if body else {}).get("startingPoint") or "main"
        found.branches[branch] = self._commit_at(found, starting_point)
        self._send_json({})

    def model_info(self, body: bytes, repo: str, revision: str = "main") -> None:
        found = self._readable_repo(repo)
        commit = self._commit_at(found, revision)
        siblings = [{"rfilename": path} for path in sorted(found.trees[commit])]
        self._send_json({"id": repo, "sha": commit, "private": found.private, "siblings": siblings, "tags": []})

    def list_tree(self, body: bytes, repo: str, revision: str, path: str = "") -> None:
        found = self._readable_repo(repo)
        tree = found.trees[self._commit_at(found, revision)]
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries, folders = [], set()
        for file_path in sorted(tree):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                stored = tree[file_path]
                entry = {"type": "file", "path": file_path, "size": len(stored.data), "oid": git_blob_oid(stored.data)}
                if stored.lfs:
                    entry["lfs"] = {"oid": stored.etag, "size": len(stored.data), "pointerSize": 134}
                entries.append(entry)
        for folder in sorted(folders):
            if recursive or "/" not in folder[len(prefix) :]:
                entries.append({"type": "directory", "path": folder, "oid": _new_oid(repo, folder)})
        self._send_json(entries)

    def resolve_file(self, body: bytes, repo: str, revision: str, path: str) -> None:
        found = self._readable_repo(repo)
        commit = self._commit_at(found, revision)
        stored = found.trees[commit].get(path)
        if stored is None:
            self._send_json(
                {"error": f"Entry not found: {path}"},
                status=404,
                headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit},
            )
            return
        headers = {"ETag": f'"{stored.etag}"', "X-Repo-Commit": commit, "Content-Type": "application/octet-stream"}
        self._send(200, stored.data, headers)

    # -- upload ----------------------------------------------------------------------------------------------
    def preupload(self, body: bytes, repo: str, revision: str) -> None:
        self._require_token()
        found = self.hub.repo(repo)
        tree = found.trees[self._commit_at(found, revision)]
        files = []
        for item in json.loads(body)["files"]:
            lfs = item["size"] >= LFS_MIN_SIZE or any(fnmatch.fnmatch(item["path"], p) for p in LFS_PATTERNS)
            existing = tree.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.etag if existing is not None else None,
                }
            )
        self._send_json({"files": files, "commitOid": found.branches.get(revision)})

    def lfs_batch(self, body: bytes, repo: str) -> None:
        self._require_token()
        self.hub.repo(repo)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "this stand-in only accepts LFS uploads")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.hub.lfs_objects:
                self.hub._announced.add(item["oid"])
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-storage/{item['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_store(self, body: bytes, oid: str) -> None:
        # Like a pre-signed storage URL: no token, but only for an object the batch endpoint announced.
        if oid not in self.hub._announced:
            raise HubError(403, f"no upload was requested for LFS object {oid}")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not match LFS object id {oid}")
        self.hub.lfs_objects[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, body: bytes, repo: str) -> None:
        self._require_token()
        payload = json.loads(body)
        data = self.hub.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        self._send_json({"message": "verified"})

    def commit(self, body: bytes, repo: str, revision: str) -> None:
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "this stand-in does not open pull requests")
        found = self.hub.repo(repo)
        parent = self._commit_at(found, revision)
        if revision not in found.branches:
            raise HubError(400, f"can only commit to a branch, not to {revision}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        sent, lfs_paths, deleted = self._apply_operations(lines[1:])
        tree = {**found.trees[parent]}
        for path in deleted:
            tree = {p: f for p, f in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        tree.update(sent)
        oid = _new_oid(repo, parent + str(time.time_ns()))
        found.trees[oid] = tree
        found.branches[revision] = oid
        self.hub.commits.append(
            RecordedCommit(
                repo_id=repo,
                revision=revision,
                oid=oid,
                summary=header.get("summary", ""),
                description=header.get("description", ""),
                files={path: stored.data for path, stored in sent.items()},
                lfs_paths=sorted(lfs_paths),
                deleted=deleted,
            )
        )
        self._send_json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})

    def _apply_operations(self, lines: list[dict]) -> tuple[dict[str, StoredFile], list[str], list[str]]:
        sent, lfs_paths, deleted = {}, [], []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding for {value['path']}")
                sent[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubError(400, f"LFS object of {value['path']} was never uploaded")
                sent[value["path"]] = StoredFile(data, lfs=True)
                lfs_paths.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        return sent, lfs_paths, deleted


def _new_oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def _card_metadata_errors(content: str) -> list[str]:
    """The checks the Hub makes on a README's YAML block that a model card can get wrong."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
    if match is None:
        return []
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"invalid YAML: {error}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets"):
        if key in metadata and not (
            isinstance(metadata[key], list) and all(isinstance(v, str) for v in metadata[key])
        ):
            errors.append(f'"{key}" must be a list of strings')
    for entry in metadata.get("model-index", []) or []:
        if not entry.get("name"):
            errors.append('"model-index[].name" is required')
        for result in entry.get("results", []):
            if not result.get("task", {}).get("type") or not result.get("dataset", {}).get("type"):
                errors.append('"model-index[].results[]" needs task.type and dataset.type')
            for metric in result.get("metrics", []):
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float)):
                    errors.append('"metrics[]" need a type and a numeric value')
    return errors


ROUTES = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>.+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", _Handler.list_tree),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", _Handler.lfs_verify),
    ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", _Handler.lfs_store),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve_file),
]
