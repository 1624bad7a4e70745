"""A test double of the Hugging Face Hub HTTP API, for the real `huggingface_hub` client.

`HubDouble` is a small HTTP server on 127.0.0.1 (random port) that answers the part of the Hub
API the client uses to check access, create repos and branches, commit files and download them:

    GET  /api/whoami-v2                               token -> user, orgs, token role
    POST /api/repos/create                            409 if it exists, honours visibility
    GET  /api/models/{repo}[/revision/{rev}]          repo_info / model_info
    GET  /api/models/{repo}/auth-check[/write]        auth_check
    POST /api/models/{repo}/preupload/{rev}           every file "regular" (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}              ndjson commit, kept in memory
    POST /api/models/{repo}/branch/{branch}           create_branch
    GET  /api/models/{repo}/refs                      list_repo_refs
    GET  /api/models/{repo}/tree/{rev}[/{path}]       list_repo_tree / list_repo_files
    GET  /api/models/{repo}/commits/{rev}             list_repo_commits
    HEAD/GET /{repo}/resolve/{rev}/{path}             hf_hub_download / snapshot_download
    POST /api/validate-yaml                           model card metadata checks

Failures are injected per route (`fail`, `drop`) and every request is logged (method, route,
path, status; never headers), so a test can assert what the client did. `point_client_at`
aims the real client at a running double for the length of a test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

ROUTES = (
    "whoami", "create_repo", "repo_info", "auth_check", "preupload", "commit", "create_branch",
    "refs", "tree", "commits", "resolve", "validate_yaml",
)  # fmt: skip

# License ids the Hub accepts in model card metadata (hub-docs: repositories-licenses.md).
HUB_LICENSES = frozenset(
    "apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 "
    "bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear "
    "c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 "
    "cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 "
    "cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl "
    "ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl "
    "lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 "
    "odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr "
    "deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 "
    "llama3.3 llama4 gemma unknown other".split()
)
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_REPO_NAME = re.compile(r"^(?![.-])[\w.-]{1,96}(?<![.-])$")
_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(content: bytes) -> str:
    """The git blob id of a file: what the Hub reports as `oid` for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Token:
    """What the double knows about a token. role: "read", "write" or "fineGrained"; a fine-grained
    token may read and write exactly the namespaces and repo ids in `scopes`. orgs: name -> role
    in that org ("read", "contributor", "write", "admin")."""

    user: str
    role: str = "write"
    orgs: dict[str, str] = field(default_factory=dict)
    scopes: tuple[str, ...] = ()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str  # summary line
    description: str
    files: dict[str, bytes]  # the full tree at this commit
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    created_at: str = ""


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Request:
    method: str
    route: str
    path: str
    status: int | None = None  # None: the connection was dropped


@dataclass
class _Call:
    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    token: Token | None = None

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubDouble:
    """A test double of the Hub HTTP API. Use as a context manager, or start()/stop()."""

    def __init__(self, tokens: dict[str, Token] | None = None):
        self.tokens: dict[str, Token] = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self._faults: dict[str, deque[tuple[str, Any]]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a dropped one is never reused

            def do_GET(self) -> None:
                double._serve(self)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # downloads open many connections at once: no SYN retransmit waits
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.handle_error = lambda *args: None  # a client hanging up mid-response is fine
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True, name="hub-double"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubDouble:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the double first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- test controls ---------------------------------------------------------------------
    def fail(self, route: str, *statuses: int, retry_after: int | None = None) -> None:
        """Answer the next requests to `route` ("*": any route) with these statuses, in order."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self._queue(route, [("status", (status, headers)) for status in statuses])

    def drop(self, count: int = 1, route: str = "*", after_handling: bool = False) -> None:
        """Close the connection without answering the next `count` requests to `route`.
        after_handling=True applies the request first (e.g. the commit lands, its answer is lost)."""
        self._queue(route, [("drop", after_handling)] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _queue(self, route: str, faults: list[tuple[str, Any]]) -> None:
        if route != "*" and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES} or '*'")
        with self._lock:
            self._faults.setdefault(route, deque()).extend(faults)

    def add_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Seed a repo, as if created on the Hub (with its initial .gitattributes commit)."""
        with self._lock:
            repo = Repo(repo_id, private, created_at=_now())
            self.repos[repo_id] = repo
            self._commit(repo, "main", "initial commit", "", {".gitattributes": _GITATTRIBUTES}, "hub")
            if files:
                self._commit(repo, "main", "seed files", "", {**self.files(repo_id), **files}, "hub")
            return repo

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits reachable from `branch`, oldest first."""
        with self._lock:
            repo = self.repos[repo_id]
            chain, sha = [], repo.branches.get(branch)
            while sha is not None:
                chain.append(repo.commits[sha])
                sha = repo.commits[sha].parent
            return chain[::-1]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def requests(self, route: str) -> list[Request]:
        return [r for r in self.log if r.route == route]

    # ---- HTTP plumbing ---------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        raw = url.path.strip("/").split("/")
        call = _Call(h.command, [unquote(s) for s in raw], parse_qs(url.query), h.headers, _read_body(h))
        route, handler = self._route(call)
        record = Request(h.command, route, url.path)
        with self._lock:
            self.log.append(record)
            fault = None
            for key in (route, "*"):
                if self._faults.get(key):
                    fault = self._faults[key].popleft()
                    break
        if fault is not None and fault[0] == "drop" and not fault[1]:
            return _hang_up(h)
        if fault is not None and fault[0] == "status":
            status, headers = fault[1]
            result: tuple[int, Any, dict] = (status, {"error": f"injected HTTP {status}"}, headers)
        else:
            try:
                self._authenticate(call)
                with self._lock:
                    result = handler(call)
            except HttpError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                result = (err.status, {"error": err.message}, headers)
        if fault is not None and fault[0] == "drop":  # dropped after handling: done, answer lost
            return _hang_up(h)
        record.status = result[0]
        _respond(h, *result)

    def _route(self, call: _Call) -> tuple[str, Any]:
        s, m = call.segments, call.method
        if s[:2] == ["api", "whoami-v2"] and m == "GET":
            return "whoami", self._whoami
        if s[:3] == ["api", "repos", "create"] and m == "POST":
            return "create_repo", self._create_repo
        if s[:2] == ["api", "validate-yaml"] and m == "POST":
            return "validate_yaml", self._validate_yaml
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            action = s[4] if len(s) > 4 else ""
            table = {
                ("GET", ""): ("repo_info", self._repo_info),
                ("GET", "revision"): ("repo_info", self._repo_info),
                ("GET", "auth-check"): ("auth_check", self._auth_check),
                ("POST", "preupload"): ("preupload", self._preupload),
                ("POST", "commit"): ("commit", self._commit_route),
                ("POST", "branch"): ("create_branch", self._create_branch),
                ("GET", "refs"): ("refs", self._refs),
                ("GET", "tree"): ("tree", self._tree),
                ("GET", "commits"): ("commits", self._commits),
            }
            if (m, action) in table:
                return table[(m, action)]
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return "resolve", self._resolve_file
        return "unknown", self._unknown

    # ---- auth ------------------------------------------------------------------------------
    def _authenticate(self, call: _Call) -> None:
        auth = call.headers.get("Authorization")
        if not auth:
            return
        value = auth.removeprefix("Bearer ").strip()
        if value not in self.tokens:
            raise HttpError(401, "Invalid credentials in Authorization header")
        call.token = self.tokens[value]

    @staticmethod
    def _can_read(token: Token | None, repo: Repo) -> bool:
        if not repo.private:
            return True
        if token is None:
            return False
        namespace = repo.repo_id.split("/")[0]
        if token.role == "fineGrained":
            return namespace in token.scopes or repo.repo_id in token.scopes
        return namespace == token.user or namespace in token.orgs

    @staticmethod
    def _can_write(token: Token | None, namespace: str, repo_id: str | None = None) -> bool:
        if token is None or token.role == "read":
            return False
        if token.role == "fineGrained":
            return namespace in token.scopes or repo_id in token.scopes
        return namespace == token.user or token.orgs.get(namespace) in ("contributor", "write", "admin")

    def _repo(self, call: _Call, write: bool = False) -> Repo:
        at = 2 if call.segments[0] == "api" else 0  # /api/models/{repo}/... or /{repo}/resolve/...
        repo_id = "/".join(call.segments[at : at + 2])
        repo = self.repos.get(repo_id)
        if repo is None or not self._can_read(call.token, repo):
            status = 401 if call.token is None else 404
            raise HttpError(status, "Repository not found", code="RepoNotFound")
        if write and not self._can_write(call.token, repo_id.split("/")[0], repo_id):
            raise HttpError(403, f"You don't have write access to {repo_id}")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _branch(self, repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {revision} is not a branch", code="RevisionNotFound")
        return revision

    def _commit(
        self, repo: Repo, branch: str, message: str, description: str, files: dict, author: str
    ) -> Commit:
        self._counter += 1
        parent = repo.branches.get(branch)
        digest = json.dumps(
            [parent, message, sorted((p, git_blob_oid(c)) for p, c in files.items()), self._counter]
        )
        commit = Commit(
            hashlib.sha1(digest.encode()).hexdigest(), parent, message, description, files, author, _now()
        )
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    # ---- routes ----------------------------------------------------------------------------
    def _whoami(self, call: _Call) -> tuple[int, Any, dict]:
        token = call.token
        if token is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        access: dict[str, Any] = {"displayName": "test-token", "role": token.role, "createdAt": _now()}
        if token.role == "fineGrained":
            scoped = [
                {
                    "entity": {
                        "type": "model" if "/" in s else "user" if s == token.user else "org",
                        "name": s,
                    },
                    "permissions": ["repo.content.read", "repo.write"],
                }
                for s in token.scopes
            ]
            access["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": scoped}
        orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": r} for o, r in token.orgs.items()]
        user = {"type": "user", "id": git_blob_oid(token.user.encode())[:24], "name": token.user}
        user |= {"fullname": token.user, "email": f"{token.user}@example.invalid", "emailVerified": True}
        return 200, {**user, "orgs": orgs, "auth": {"type": "access_token", "accessToken": access}}, {}

    def _create_repo(self, call: _Call) -> tuple[int, Any, dict]:
        if call.token is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        payload = call.json()
        if payload.get("type", "model") not in (None, "model"):
            raise HttpError(400, "the Hub double only has model repos")
        name, namespace = str(payload.get("name", "")), payload.get("organization") or call.token.user
        if not _REPO_NAME.match(name) or "--" in name or ".." in name:
            raise HttpError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        if not self._can_write(call.token, namespace):
            raise HttpError(
                403, f'You don\'t have the rights to create a model under the namespace "{namespace}"'
            )
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.add_repo(repo_id, private=private)
        return 200, {"url": url, "name": repo_id, "id": git_blob_oid(repo_id.encode())[:24]}, {}

    def _repo_info(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call)
        commit = repo.commits[self._resolve(repo, call.segments[5] if len(call.segments) > 5 else "main")]
        info = {
            "_id": git_blob_oid(repo.repo_id.encode())[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        card = _card_metadata(commit.files.get("README.md", b"").decode("utf-8", "replace"))
        if isinstance(card, dict):
            info["cardData"] = card
            if isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
        return 200, info, {}

    def _auth_check(self, call: _Call) -> tuple[int, Any, dict]:
        self._repo(call, write=call.segments[-1] == "write")
        return 200, {}, {}

    def _preupload(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call, write=True)
        head = repo.commits[repo.branches[self._branch(repo, call.segments[5])]].files
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(head[f["path"]]) if f["path"] in head else None,
            }
            for f in call.json().get("files", [])
        ]
        return 200, {"files": files, "commitOid": repo.branches[call.segments[5]]}, {}

    def _commit_route(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call, write=True)
        branch = self._branch(repo, call.segments[5])
        if call.query.get("create_pr"):
            raise HttpError(400, "the Hub double does not do pull requests")
        lines = [json.loads(line) for line in call.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != repo.branches[branch]:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[repo.branches[branch]].files)
        for op in lines[1:]:
            key, value = op.get("key"), op.get("value", {})
            if key == "file":
                raw = value["content"]
                files[value["path"]] = (
                    base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                )
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"the Hub double takes regular uploads only, not {key!r}")
        commit = self._commit(repo, branch, header.get("summary", ""), header.get("description", ""), files,
                              call.token.user if call.token else "anonymous")  # fmt: skip
        url = f"{self.url}/{repo.repo_id}/commit/{commit.sha}"
        return 200, {"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None}, {}

    def _create_branch(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call, write=True)
        branch = call.segments[5]
        if branch in repo.branches:
            raise HttpError(409, "Reference already exists")
        repo.branches[branch] = self._resolve(repo, call.json().get("startingPoint") or "main")
        return 200, {}, {}

    def _refs(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()
        ]
        return 200, {"branches": branches, "converts": [], "tags": []}, {}

    def _tree(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call)
        files = repo.commits[self._resolve(repo, call.segments[5])].files
        base = "/".join(call.segments[6:]).strip("/")
        recursive = call.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = f"{base}/" if base else ""
        entries: dict[str, dict] = {}
        for path, content in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                if depth == 1 or recursive:
                    folder = prefix + "/".join(parts[:depth])
                    oid = git_blob_oid(folder.encode())
                    entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
            if len(parts) == 1 or recursive:
                entries[path] = {
                    "type": "file",
                    "oid": git_blob_oid(content),
                    "size": len(content),
                    "path": path,
                }
        if base and not entries:
            raise HttpError(404, f"{base} does not exist", code="EntryNotFound")
        return 200, [entries[p] for p in sorted(entries)], {}

    def _commits(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call)
        sha: str | None = self._resolve(repo, call.segments[5])
        out = []
        while sha is not None:
            c = repo.commits[sha]
            message = c.message + (f"\n\n{c.description}" if c.description else "")
            out.append({"id": c.sha, "title": c.message, "message": message,
                        "authors": [{"user": c.author}], "date": c.date})  # fmt: skip
            sha = c.parent
        return 200, out, {}

    def _resolve_file(self, call: _Call) -> tuple[int, Any, dict]:
        repo = self._repo(call)
        sha = self._resolve(repo, call.segments[3])
        path = "/".join(call.segments[4:])
        if path not in repo.commits[sha].files:
            raise HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        content = repo.commits[sha].files[path]
        headers = {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": sha, "Accept-Ranges": "none"}
        return 200, content, headers

    def _validate_yaml(self, call: _Call) -> tuple[int, Any, dict]:
        content = call.json().get("content")
        errors, warnings = _check_card(content)
        if errors and "text/plain" in (call.headers.get("Accept") or ""):
            return 400, "\n".join(errors), {}
        status = 400 if errors else 200
        return (
            status,
            {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]},
            {},
        )

    def _unknown(self, call: _Call) -> tuple[int, Any, dict]:
        raise HttpError(404, f"not implemented by the Hub double: {call.method} /{'/'.join(call.segments)}")


# ---- model card checks ---------------------------------------------------------------------
def _card_metadata(text: str) -> Any:
    match = _YAML_BLOCK.match(text)
    if not match:
        return None
    try:
        return yaml.safe_load(match.group(2))
    except yaml.YAMLError:
        return None


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_card(content: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md, checked the way the Hub checks model card metadata."""
    if not isinstance(content, str):
        return ['"content" must be a string'], []
    match = _YAML_BLOCK.match(content)
    if not match:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        return [f"Invalid YAML in model card metadata: {err}"], []
    if meta is None:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["model card metadata must be a YAML mapping (key: value)"], []
    errors = []
    if "license" in meta and meta["license"] not in HUB_LICENSES:
        errors.append(f'"license" must be one of the Hub license ids, got {meta["license"]!r}')
    if "base_model" in meta and not (isinstance(meta["base_model"], str) or _str_list(meta["base_model"])):
        errors.append('"base_model" must be a string or a list of strings')
    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    if "tags" in meta and not _str_list(meta["tags"]):
        errors.append('"tags" must be a list of strings')
    for key in ("language", "datasets"):
        if key in meta and not (isinstance(meta[key], str) or _str_list(meta[key])):
            errors.append(f'"{key}" must be a string or a list of strings')
    return errors, []


# ---- socket helpers ------------------------------------------------------------------------
def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while size := int(h.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
        h.rfile.readline()
        return b"".join(chunks)
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def _respond(h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict) -> None:
    if isinstance(body, bytes):
        data, ctype = body, "application/octet-stream"
    elif isinstance(body, str):
        data, ctype = body.encode(), "text/plain; charset=utf-8"
    else:
        data, ctype = json.dumps(body).encode(), "application/json"
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(data)))
    for key, value in headers.items():
        h.send_header(key, value)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(data)


def _hang_up(h: BaseHTTPRequestHandler) -> None:
    h.close_connection = True
    try:
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---- pointing the real client at the double ------------------------------------------------
def point_client_at(double: HubDouble, monkeypatch: Any, home: Path) -> None:
    """Aim huggingface_hub at `double` for one test: HF_ENDPOINT (read once at import, so the
    constants and the module-level HfApi are patched too), no Xet, no telemetry, no offline
    mode, and a cache and token store under `home` so no real token or cached file is used."""
    from huggingface_hub import constants, hf_api

    # huggingface_hub.whoami, create_repo... are bound to an HfApi made at import time
    monkeypatch.setattr(hf_api.api, "endpoint", double.url)
    settings = {
        "ENDPOINT": double.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": double.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HOME": str(home),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    env = {
        "HF_ENDPOINT": double.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_XET_CACHE": str(home / "xet"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HF_TOKEN_FILE", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)


# ---- the Hub's card check, as a client calls it ------------------------------------------------
_CARD_HEADER = re.compile(r"^\s*---[\r\n]+[\S\s]*?[\r\n]+---(\r\n|\n|$)")


def validate_card_metadata(readme_text: str, token: str | None = None, endpoint: str | None = None) -> list[str]:
    """The Hub's objections to a model card's YAML header (empty: it passes /api/validate-yaml)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if not _CARD_HEADER.match(readme_text):
        return ["README.md has no YAML metadata header (a block between '---' lines at the top)"]
    url = f"{(endpoint or constants.ENDPOINT).rstrip('/')}/api/validate-yaml"
    body = {"content": readme_text, "repoType": "model"}
    headers = build_hf_headers(token=token) if token else {}
    response = get_session().post(url, json=body, headers=headers, timeout=10.0)
    if response.status_code == 400:
        errors = response.json().get("errors") or [{"message": response.text}]
        return [str(e.get("message", e)) for e in errors]
    hf_raise_for_status(response)
    return []
