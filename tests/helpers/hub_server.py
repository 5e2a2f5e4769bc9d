"""A local Hugging Face Hub for tests: enough of the Hub's HTTP API for huggingface_hub's real
client to create a repo, upload a folder and download it back (`hf_hub_download`,
`snapshot_download`, `from_pretrained(repo_id)`), with no network.

    with HubServer() as hub:
        env = hub.env(tmp_path)          # HF_ENDPOINT, HF_TOKEN, HF_HOME, ...
        subprocess.run([...], env={**os.environ, **env})   # clients in fresh processes
        hub.files("hf-zero-test/tiny")   # {path: bytes} at main

huggingface_hub reads HF_ENDPOINT once, when it is imported, so the clients run in processes
started with `env` (a subprocess, or spawned workers with it in their environment).

The server is a stdlib ThreadingHTTPServer on 127.0.0.1 in a daemon thread of the test process;
repos live in memory. Model repos only, and only these routes (what huggingface_hub 2.4 sends):

    POST /api/repos/create                          create_repo: 409 when it exists (exist_ok)
    GET  /api/whoami-v2                             whoami
    POST /api/validate-yaml                         README metadata check before an upload
    GET  /api/models/{repo}[/revision/{rev}]        model_info / repo_info (siblings, sha)
    GET  /api/models/{repo}/tree/{rev}[/{path}]     list_repo_tree / list_repo_files
    GET  /api/models/{repo}/refs                    list_repo_refs
    POST /api/models/{repo}/branch/{branch}         create_branch: 409 when it exists
    POST /api/models/{repo}/preupload/{rev}         every file uploadMode "regular", with the oid
                                                    of the file already there (unchanged: skip)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), deletedFile,
                                                    deletedFolder; lfsFile is refused
    HEAD/GET /{repo}/resolve/{rev}/{path}           the file, with ETag (git blob oid),
                                                    X-Repo-Commit, Content-Length; Range: bytes=N-

A new repo starts with one empty commit (the real Hub adds a .gitattributes; tests here assert
the exact file list). Writes need `Authorization: Bearer <token>`; a private repo is visible only
with it. Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) so
the client raises its usual exceptions. Any other route answers 404 and is printed to stderr and
kept in `unhandled`: tests assert it stays empty, so a client change that needs a new route fails
with a readable message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "TOKEN", "USER", "git_blob_oid", "save_tiny_checkpoint"]

TOKEN = "hf_localtesttoken"
USER = "hf-zero-test"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data`: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.body = body or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubServer:
    """The local Hub. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, *, token: str = TOKEN, user: str = USER) -> None:
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, home: str | Path) -> dict[str, str]:
        """Environment for a client process: this endpoint and token, a fresh cache under
        `home`, no telemetry, no progress bars, online."""
        home = Path(home)
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HOME": str(home / "hf_home"),
            "HF_HUB_CACHE": str(home / "hf_home" / "hub"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # ---- what tests read -----------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (a branch or commit oid)."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, f"{repo_id} has no revision {revision!r}"
            return dict(commit.files)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The history of `revision`, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            out, commit = [], repo.resolve(revision)
            while commit is not None:
                out.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    # ---- state changes (under the lock) ------------------------------------------------------

    def _commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, bytes]) -> str:
        self._counter += 1
        h = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{self._counter}".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_oid(files[path])}\0".encode())
        oid = h.hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, files, _now())
        return oid


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a length

    def log_message(self, format, *args) -> None:  # quiet: requests are kept in hub.requests
        pass

    # ---- plumbing ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode())

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        body = self._body() if method in ("POST", "PUT") else b""
        self.hub.requests.append((method, url.path))
        try:
            handled = self._route(method, parts, body)
            if not handled:
                msg = f"hub_server: UNHANDLED {method} {self.path}"
                print(msg, file=sys.stderr, flush=True)
                self.hub.unhandled.append(f"{method} {self.path}")
                raise HttpError(404, f"{msg} (tests/helpers/hub_server.py does not serve it)")
        except HttpError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": e.message, **e.body}).encode(), headers)

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        if write:
            self._require_auth()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HttpError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ---- routes ------------------------------------------------------------------------------

    def _route(self, method: str, p: list[str], body: bytes) -> bool:
        hub = self.hub
        if p[:1] == ["api"]:
            if method == "POST" and p[1:] == ["repos", "create"]:
                self._create_repo(json.loads(body or b"{}"))
            elif method == "GET" and p[1:] == ["whoami-v2"]:
                self._require_auth()
                self._json(
                    {
                        "type": "user",
                        "name": hub.user,
                        "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                    }
                )
            elif method == "POST" and p[1:] == ["validate-yaml"]:
                self._validate_yaml(json.loads(body or b"{}"))
            elif len(p) >= 4 and p[1] == "models":
                return self._model_api(method, f"{p[2]}/{p[3]}", p[4:], body)
            else:
                return False
            return True
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
            return True
        return False

    def _model_api(self, method: str, repo_id: str, rest: list[str], body: bytes) -> bool:
        with self.hub.lock:
            if method == "GET" and (not rest or rest[0] == "revision"):
                repo = self._repo(repo_id)
                commit = self._revision(repo, rest[1] if len(rest) > 1 else "main")
                self._json(self._info(repo, commit))
            elif method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                repo = self._repo(repo_id)
                commit = self._revision(repo, rest[1])
                self._tree(commit, "/".join(rest[2:]))
            elif method == "GET" and rest == ["refs"]:
                repo = self._repo(repo_id)
                branches = [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                    for b, oid in repo.branches.items()
                ]
                self._json({"branches": branches, "tags": [], "converts": []})
            elif method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                self._create_branch(self._repo(repo_id, write=True), rest[1], body)
            elif method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                self._preupload(self._repo(repo_id, write=True), rest[1], json.loads(body))
            elif method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                self._commit(self._repo(repo_id, write=True), rest[1], body)
            else:
                return False
        return True

    def _create_repo(self, payload: dict) -> None:
        self._require_auth()
        if payload.get("type") not in (None, "model"):
            raise HttpError(400, f"hub_server serves model repos only, got {payload['type']!r}")
        name = payload.get("name")
        if not name or "/" in name:
            raise HttpError(400, f"bad repo name {name!r}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                # The client reads the url from the 409 too (create_repo(exist_ok=True)).
                raise HttpError(409, "You already created this model repo", body={"url": url})
            repo = Repo(repo_id, private=payload.get("visibility") == "private", created=_now())
            repo.branches["main"] = self.hub._commit(repo, None, "initial commit", {})
            self.hub.repos[repo_id] = repo
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            header = content.split("---", 2)[1] if content.count("---") >= 2 else None
            try:
                if header is None or not isinstance(yaml.safe_load(header) or {}, dict):
                    errors.append({"message": "metadata must be a YAML mapping between --- lines"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_oid(data)}
                for path, data in sorted(commit.files.items())
            ],
        }

    def _tree(self, commit: Commit, prefix: str) -> None:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        under = {p: d for p, d in commit.files.items() if p.startswith(base)}
        if prefix and not under:
            raise HttpError(404, f"{prefix} does not exist", "EntryNotFound", commit.oid)
        entries, folders = [], set()
        for path, data in sorted(under.items()):
            rel = path[len(base) :].split("/")
            for depth in range(1, len(rel)):
                folders.add((base + "/".join(rel[:depth]), depth))
            if recursive or len(rel) == 1:
                entries.append(
                    {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
                )
        for path, depth in sorted(folders):
            if recursive or depth == 1:
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": path})
        self._json(entries)

    def _create_branch(self, repo: Repo, branch: str, body: bytes) -> None:
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        if branch in repo.branches:
            raise HttpError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = self._revision(repo, start).oid
        self._json({})

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        if self.query.get("create_pr"):
            raise HttpError(400, "hub_server does not serve pull requests")
        commit = self._revision(repo, revision)
        files = []
        for f in payload.get("files", []):
            have = commit.files.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": None if have is None else git_blob_oid(have),
                }
            )
        self._json({"files": files, "commitOid": commit.oid})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        if self.query.get("create_pr"):
            raise HttpError(400, "hub_server does not serve pull requests")
        if revision not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        header = None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and parent != head.oid:
                    raise HttpError(412, f"parent commit {parent} is not the head {head.oid}")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, f"file {value.get('path')}: encoding must be base64")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {value['path']}")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            elif key == "lfsFile":
                raise HttpError(
                    400, f"lfsFile {value.get('path')}: this server answered uploadMode regular"
                )
            else:
                raise HttpError(400, f"unknown commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise HttpError(400, "the commit has no header with a summary")
        oid = self.hub._commit(repo, head.oid, header["summary"], files)
        repo.branches[revision] = oid
        self._json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{oid}",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._revision(repo, revision)
            data = commit.files.get(path)
        if data is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status, start = 200, 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].endswith("-") and rng[6:-1].isdigit():
            start = min(int(rng[6:-1]), len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, data[start:], headers)


# ---- a model to push ---------------------------------------------------------------------------


def save_tiny_checkpoint(path: str | Path, *, stage: int = 2, steps: int = 2) -> dict:
    """Train a tiny GPT-2 (tied embeddings) for `steps` AdamW steps with hf_zero at world size 1
    (no process group) and save a sharded checkpoint at `path`.

    Returns:
        {"loss": last step's loss, "memory_stats": engine.memory_stats(), "input_ids": a batch,
        "logits": the trained model's logits on it}, to compare what a pushed repo loads.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_zero

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=128,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    engine = hf_zero.initialize(model, optimizer, config=hf_zero.ZeroConfig(stage=stage))
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
    engine.save_checkpoint(path)
    engine.module.eval()  # dropout off, as from_pretrained leaves a model
    with torch.no_grad():
        logits = engine.module(input_ids=ids).logits
    return {
        "loss": loss.item(),
        "memory_stats": engine.memory_stats(),
        "input_ids": ids,
        "logits": logits,
    }


if __name__ == "__main__":  # python -m tests.helpers.hub_server: serve until interrupted
    with HubServer() as hub:
        print(f"HF_ENDPOINT={hub.url} HF_TOKEN={hub.token}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
