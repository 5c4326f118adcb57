"""A Hugging Face Hub stand-in for tests: olah (a real Hub mirror server) behind a small write/404 front.

Tests talk to it with the real `huggingface_hub` client over HTTP on 127.0.0.1 (no mock of the client).

    client ──HTTP──> front (this module, ThreadingHTTPServer) ──HTTP──> olah (subprocess, offline mode)
                       │                                                  │
                       └── writes commits into ── mirrors/<type>s/<org>/<name> (git repos) ──┘ reads

olah serves every read (repo info, tree listings, HEAD/GET of files) from git repos in its mirror folder. The
front fills the gaps of olah that the client needs, verified against olah 0.5.4:

* writes: olah has no upload API. The front implements ``POST /api/repos/create``, ``/preupload/{rev}``
  (answers ``uploadMode: "regular"`` for every file, so no LFS/Xet server is needed), ``/commit/{rev}`` (NDJSON:
  header, file, deletedFile, deletedFolder lines; ``create_pr=1``), ``/branch/{name}`` and
  ``/api/validate-yaml``, committing into the git repos with git plumbing (any branch, no worktree).
* errors: olah answers 401 RepoNotFound for a missing file, a missing revision and a missing repo alike. The
  front checks repo, revision and path in git first and answers like the Hub: 404 with ``X-Error-Code``
  ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound`` (transformers probes optional files and needs the
  EntryNotFound answer).
* ``GET /api/models/{repo}`` without a revision (olah: 401) is forwarded as ``.../revision/main``; revisions with
  a slash (``refs/pr/1``, which olah cannot route) are forwarded as their commit sha.
* olah crashes (500) on a non-UTF-8 file of 121..149 bytes (it tries to parse every file of that size as a
  git-LFS pointer), which tiny safetensors files hit. The front stores binary or large files the way the Hub
  does, as git-LFS objects (pointer in git, content in ``.git/lfs/objects``), which olah serves correctly.

Everything else is forwarded to olah unchanged. Both servers bind 127.0.0.1 on free ports.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = ("models", "datasets", "spaces")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-authorization",
               "proxy-authenticate", "trailer", "content-length"}
GIT_ENV = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@127.0.0.1", "GIT_COMMITTER_NAME": "hub",
           "GIT_COMMITTER_EMAIL": "hub@127.0.0.1", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    """An error answered like the Hub: status, X-Error-Code and a JSON body."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob with this content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_binary(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class GitRepo:
    """One mirrored repository: a non-bare git repo written with plumbing only (the worktree stays empty)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def git(self, *args: str, input: bytes | None = None, env: dict | None = None, check: bool = True) -> bytes:
        result = subprocess.run(["git", "-C", str(self.path), *args], input=input, capture_output=True,
                                env={**os.environ, **GIT_ENV, **(env or {})})
        if check and result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def init(self) -> None:
        self.path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        self.commit("main", {".gitattributes": GITATTRIBUTES}, set(), "initial commit")

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch, tag, ``refs/...`` name or sha; None if it does not exist."""
        if not revision or revision.startswith("-"):
            return None
        out = self.git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
        return out.decode().strip() or None

    def object_type(self, sha: str, path: str) -> str | None:
        """'blob', 'tree' or None for `path` in commit `sha`."""
        path = path.strip("/")
        if not path:
            return "tree"
        out = self.git("cat-file", "-t", f"{sha}:{path}", check=False)
        return out.decode().strip() or None

    def read(self, sha: str, path: str) -> bytes:
        """The content of a file, following a git-LFS pointer to its object."""
        data = self.git("cat-file", "blob", f"{sha}:{path}")
        match = re.fullmatch(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize \d+\n",
                             data)
        if match:
            oid = match.group(1).decode()
            return (self.path / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes()
        return data

    def store(self, data: bytes) -> str:
        """Write a blob (as an LFS pointer + object for binary or large data) and return its git object id."""
        if is_binary(data) or len(data) >= LFS_THRESHOLD:
            oid = hashlib.sha256(data).hexdigest()
            target = self.path / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        return self.git("hash-object", "-w", "--stdin", input=data).decode().strip()

    def commit(self, ref: str, files: dict[str, bytes], deletions: set[str], message: str,
               parent: str | None = None, create: bool = False) -> str:
        """Commit `files` (path -> content) and `deletions` (paths; 'dir/' removes a folder) on `ref`.

        `ref` is a branch name or a full ``refs/...`` name; with `create` the ref is made from `parent`.
        """
        full_ref = ref if ref.startswith("refs/") else f"refs/heads/{ref}"
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            head = parent if create else self.resolve(full_ref)
            if head:
                self.git("read-tree", head, env=env)
            for path in deletions:
                listed = self.git("ls-files", "-z", "--", path.rstrip("/"), env=env).split(b"\0")
                for item in filter(None, listed):
                    self.git("update-index", "--force-remove", "--", item.decode(), env=env)
            for path, data in files.items():
                oid = self.store(data)
                self.git("update-index", "--add", "--cacheinfo", f"100644,{oid},{path}", env=env)
            tree = self.git("write-tree", env=env).decode().strip()
            args = ["commit-tree", tree, "-m", message] + (["-p", head] if head else [])
            sha = self.git(*args).decode().strip()
            self.git("update-ref", full_ref, sha, *([] if create or not head else [head]))
            return sha

    def refs(self, prefix: str) -> list[str]:
        out = self.git("for-each-ref", "--format=%(refname)", prefix).decode()
        return [line for line in out.splitlines() if line]


class HubServer:
    """olah + the front, started and stopped by a test fixture. `url` is the endpoint for huggingface_hub."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request the front received
        self.fail_downloads: set[tuple[str, str]] = set()  # (repo_id, path): GET answers 403 (fault injection)
        self._repos: dict[Path, GitRepo] = {}
        self._repos_lock = threading.Lock()
        self._olah: subprocess.Popen | None = None
        self._front: ThreadingHTTPServer | None = None
        self.olah_port = 0

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> HubServer:
        self.mirrors.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (FrontHandler,), {"hub": self})
        self._front = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._front.daemon_threads = True
        threading.Thread(target=self._front.serve_forever, name="hub-front", daemon=True).start()
        self._start_olah(timeout)
        return self

    def _start_olah(self, timeout: float) -> None:
        self.olah_port = free_port()
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "{self.netloc}"\nmirror-lfs-netloc = "{self.netloc}"\n'
            "[accessibility]\noffline = true\n"
        )
        log = open(self.root / "olah.log", "wb")  # noqa: SIM115 - closed in stop()
        self._olah_log = log
        self._olah = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(self.root / "logs")],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._olah.poll() is not None:
                raise RuntimeError(f"olah exited with {self._olah.returncode}:\n{self.olah_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.olah_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not start within {timeout}s:\n{self.olah_log()}")

    def stop(self) -> None:
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._olah is not None:
            self._olah.terminate()
            try:
                self._olah.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
                self._olah.wait()
            self._olah = None
            self._olah_log.close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def olah_log(self) -> str:
        path = self.root / "olah.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    @property
    def netloc(self) -> str:
        assert self._front is not None, "server not started"
        return f"127.0.0.1:{self._front.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    # ---- repositories -----------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str, repo_type: str = "models") -> Path:
        org, _, name = repo_id.rpartition("/")
        return self.mirrors / repo_type / org / name

    def repo(self, repo_id: str, repo_type: str = "models") -> GitRepo | None:
        """The git repo behind `repo_id`, or None if it was never created."""
        path = self.repo_dir(repo_id, repo_type)
        with self._repos_lock:
            if path not in self._repos:
                if not (path / ".git").is_dir():
                    return None
                self._repos[path] = GitRepo(path)
            return self._repos[path]

    def create_repo(self, repo_id: str, repo_type: str = "models") -> GitRepo:
        path = self.repo_dir(repo_id, repo_type)
        with self._repos_lock:
            if path.exists():
                raise HubError(409, None, f"You already created this {repo_type[:-1]} repo")
            repo = GitRepo(path)
            repo.init()
            self._repos[path] = repo
            return repo

    def delete_repo(self, repo_id: str, repo_type: str = "models") -> None:
        path = self.repo_dir(repo_id, repo_type)
        with self._repos_lock:
            self._repos.pop(path, None)
            shutil.rmtree(path, ignore_errors=True)

    def commits(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit shas reachable from `revision`, newest first (for assertions)."""
        repo = self.repo(repo_id)
        assert repo is not None, f"no repo {repo_id}"
        return repo.git("rev-list", revision).decode().split()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of the repo at `revision` with its (LFS-resolved) content (for assertions)."""
        repo = self.repo(repo_id)
        assert repo is not None, f"no repo {repo_id}"
        sha = repo.resolve(revision)
        names = repo.git("ls-tree", "-r", "-z", "--name-only", sha).split(b"\0")
        return {n.decode(): repo.read(sha, n.decode()) for n in names if n}


class FrontHandler(BaseHTTPRequestHandler):
    """Routes one request: Hub write API and Hub-style 404s here, everything else to olah."""

    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    # ---- dispatch ---------------------------------------------------------------------------------------------
    def _handle(self) -> None:
        self.hub.requests.append((self.command, self.path))
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            forward_path = self._route(segments, split.query)
        except HubError as err:
            self._send_json(err.status, {"error": err.message}, err.code, err.message)
            return
        except Exception as err:  # a bug here must show up in the test, not hang the client
            self._send_json(500, {"error": f"{type(err).__name__}: {err}"})
            return
        if forward_path is not None:
            self._forward(forward_path)

    def _route(self, seg: list[str], query: str) -> str | None:
        """Answer the request, or return the path (with query) to forward to olah."""
        method = self.command
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in REPO_TYPES:
            return self._api_repo(seg[1], f"{seg[2]}/{seg[3]}", seg[4:], query)
        repo_type, rest = (seg[0], seg[1:]) if seg[0] in REPO_TYPES else ("models", seg)
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision, path = f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:])
            repo = self._existing_repo(repo_id, repo_type)
            sha = self._existing_revision(repo, revision)
            if repo.object_type(sha, path) != "blob":
                raise HubError(404, "EntryNotFound", "Entry not found")
            if method == "GET" and (repo_id, path) in self.hub.fail_downloads:
                raise HubError(403, None, "Injected download failure (HubServer.fail_downloads)")
            return self._with_revision(revision, sha, query)
        return self.path

    def _api_repo(self, repo_type: str, repo_id: str, rest: list[str], query: str) -> str | None:
        method = self.command
        repo = self._existing_repo(repo_id, repo_type)
        if not rest and method == "GET":  # olah needs the revision: the Hub means the default branch
            return f"/api/{repo_type}/{repo_id}/revision/main" + (f"?{query}" if query else "")
        action, revision = (rest + ["", ""])[:2]
        if action == "branch" and method == "POST":
            return self._create_branch(repo, revision)
        if action in ("preupload", "commit", "revision", "tree", "paths-info"):
            sha = self._existing_revision(repo, revision)
            if action == "preupload" and method == "POST":
                return self._preupload(repo, sha)
            if action == "commit" and method == "POST":
                return self._commit(repo_type, repo_id, repo, revision, sha)
            if action == "tree" and len(rest) > 2 and repo.object_type(sha, "/".join(rest[2:])) != "tree":
                raise HubError(404, "EntryNotFound", "Entry not found")
            return self._with_revision(revision, sha, query)
        return self.path

    def _existing_repo(self, repo_id: str, repo_type: str) -> GitRepo:
        repo = self.hub.repo(repo_id, repo_type)
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _existing_revision(repo: GitRepo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _with_revision(self, revision: str, sha: str, query: str) -> str:
        """The request path, with a slashed revision (refs/pr/N) replaced by its sha for olah."""
        if "/" not in revision:
            return self.path
        path = urlsplit(self.path).path.replace(quote(revision, safe=""), sha, 1)
        return path + (f"?{query}" if query else "")

    # ---- write API --------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = json.loads(self.body or b"{}")
        repo_type = (payload.get("type") or "model") + "s"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            raise HubError(400, None, "This test server needs a namespace: use 'org/name'.")
        try:
            self.hub.create_repo(repo_id, repo_type)
        except HubError as err:
            self._send_json(err.status, {"error": err.message, "url": self._repo_url(repo_type, repo_id)})
            return
        self._send_json(200, {"url": self._repo_url(repo_type, repo_id), "name": repo_id})

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "models" else f"{repo_type}/"
        return f"{self.hub.url}/{prefix}{repo_id}"

    def _validate_yaml(self) -> None:
        """Reject README front matter that is not a YAML mapping (the Hub validates more)."""
        import yaml

        content = json.loads(self.body or b"{}").get("content", "")
        match = re.match(r"\A---\n(.*?)\n---", content, flags=re.S)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._send_json(400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
        if data is not None and not isinstance(data, dict):
            return self._send_json(400, {"errors": [{"message": "Metadata must be a mapping"}], "warnings": []})
        return self._send_json(200, {"errors": [], "warnings": []})

    def _create_branch(self, repo: GitRepo, branch: str) -> None:
        if repo.resolve(f"refs/heads/{branch}") is not None:
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        sha = self._existing_revision(repo, start)
        repo.git("update-ref", f"refs/heads/{branch}", sha)
        self._send_json(200, {})

    def _preupload(self, repo: GitRepo, sha: str) -> None:
        files = json.loads(self.body or b"{}").get("files", [])
        answer = []
        for item in files:
            oid = git_blob_sha1(repo.read(sha, item["path"])) if repo.object_type(sha, item["path"]) == "blob" else None
            answer.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": answer, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, repo: GitRepo, revision: str, sha: str) -> None:
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        files: dict[str, bytes] = {}
        deletions: set[str] = set()
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.add(value["path"] + ("/" if key == "deletedFolder" else ""))
            elif key == "lfsFile":
                raise HubError(422, None, "This test server takes inline (regular) files only, not LFS uploads.")
        if header.get("parentCommit") and header["parentCommit"] != sha:
            raise HubError(412, None, "A commit has happened since the parent commit. Please retry.")
        message = header.get("summary") or "commit"
        if header.get("description"):
            message += "\n\n" + header["description"]
        base = self._repo_url(repo_type, repo_id)
        pr_url = None
        if self.query.get("create_pr") == ["1"]:
            numbers = [int(ref.rsplit("/", 1)[1]) for ref in repo.refs("refs/pr/")]
            number = max(numbers, default=0) + 1
            new_sha = repo.commit(f"refs/pr/{number}", files, deletions, message, parent=sha, create=True)
            pr_url = f"{base}/discussions/{number}"
        else:
            new_sha = repo.commit(revision, files, deletions, message)
        self._send_json(200, {"success": True, "commitOid": new_sha, "commitUrl": f"{base}/commit/{new_sha}",
                              "pullRequestUrl": pr_url})

    # ---- responses --------------------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict, code: str | None = None, message: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if code:
            self.send_header("X-Error-Code", code)
        if message and status >= 400:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, path: str) -> None:
        """Send the request to olah and relay the answer (Host kept, so olah's redirects point to the front)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.hub.olah_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            if self.body:
                headers["Content-Length"] = str(len(self.body))
            conn.request(self.command, path, body=self.body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS:
                    self.send_header(key, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length") or "0")
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()


def use_hub(monkeypatch, endpoint: str, hf_home: str | os.PathLike) -> None:
    """Point huggingface_hub (and transformers, which reads it at call time) at `endpoint` with an empty HF_HOME.

    huggingface_hub reads HF_ENDPOINT / HF_HOME once, at import, into `huggingface_hub.constants`; HfApi(),
    hf_hub_download, snapshot_download and transformers' cached_file read those module attributes at call time, so
    patching them works after the import too. One exception, verified: the module-level helpers
    (`huggingface_hub.file_exists`, `model_info`, ...) belong to an HfApi made at import, patched separately. The environment variables are set too, for child
    processes. No token is read (HF_TOKEN unset, token paths inside the temporary HF_HOME) and offline mode is
    off (tests/conftest.py turns it on for the other tests).
    """
    from huggingface_hub import constants, hf_api

    hf_home = str(hf_home)
    hub_cache = os.path.join(hf_home, "hub")
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HOME": hf_home, "HF_HUB_CACHE": hub_cache,
                        "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    # The module-level helpers (huggingface_hub.file_exists, model_info, ...; PEFT uses them) are bound methods of
    # one HfApi made at import time, which copied the endpoint then.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
