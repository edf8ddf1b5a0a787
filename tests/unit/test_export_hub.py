"""push_to_hub against huggingface_hub's real client with its HTTP layer replaced by a mock Hub.

``huggingface_hub.set_client_factory`` swaps the ``httpx`` client the library uses for every call; the
mock transport answers create-repo, preupload and commit like the Hub does and records every request,
so the test sees exactly what would go over the wire: repo id, visibility, files, token header.
"""

import base64
import json
import re

import pytest

from nemodiff_train.export import ExportError, push_to_hub

pytestmark = pytest.mark.unit

TOKEN = "hf_TESTsecretTOKEN1234567890"


class MockHub:
    def __init__(self, fail_create: bool = False, existing: str | None = None):
        self.requests = []
        self.fail_create = fail_create
        self.existing = existing  # None: no such repo yet; "public" / "private": its visibility

    def handler(self, request):
        import huggingface_hub.utils._http as hf_http

        httpx = hf_http.httpx2 if hasattr(hf_http, "httpx2") else hf_http.httpx
        body = request.read()
        self.requests.append({"method": request.method, "path": request.url.path,
                              "auth": request.headers.get("authorization"), "body": body})
        path = request.url.path
        if path == "/api/repos/create":
            if self.fail_create:  # a server error that echoes the credentials back
                return httpx.Response(401, json={"error": f"Invalid credentials in Authorization header: {TOKEN}"})
            self.existing = json.loads(body).get("visibility") or ("private" if json.loads(body).get("private") else "public")
            return httpx.Response(200, json={"url": "https://huggingface.co/acme/dlm", "name": "acme/dlm"})
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/main)?/?", path)
        if request.method == "GET" and info:  # repo_info
            if self.existing is None:  # what the Hub answers for a missing repo
                return httpx.Response(404, headers={"X-Error-Code": "RepoNotFound"},
                                      json={"error": "Repository not found"})
            return httpx.Response(200, json={"id": info.group(1), "private": self.existing == "private",
                                             "sha": "b" * 40, "siblings": []})
        if path == "/api/validate-yaml":  # the client checks a README's front matter before the commit
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/acme/dlm/commit/" + "a" * 40,
                                             "commitOid": "a" * 40, "pullRequestUrl": None})
        return httpx.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def committed_files(self):
        commit = [r for r in self.requests if "/commit/" in r["path"]]
        assert len(commit) == 1
        lines = [json.loads(x) for x in commit[0]["body"].decode().splitlines() if x.strip()]
        return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    import huggingface_hub.utils._http as hf_http

    httpx = hf_http.httpx2 if hasattr(hf_http, "httpx2") else hf_http.httpx
    mock = MockHub()
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(mock.handler)))
    hf_http.close_session()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield mock
    huggingface_hub.set_client_factory(hf_http.default_client_factory)
    hf_http.close_session()


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "export"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "qwen3"}')
    (out / "model.safetensors").write_bytes(b"\0" * 1234)
    (out / "README.md").write_text("# card\n")
    (out / "sub" / "extra.txt").write_text("x")
    return out


def test_upload_sends_files_repo_and_privacy_and_never_prints_the_token(hub, folder, capsys):
    plan = push_to_hub(folder, "acme/dlm", private=True, token=TOKEN)
    create = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1
    sent = json.loads(create[0]["body"])
    assert (sent["organization"], sent["name"], sent["visibility"]) == ("acme", "dlm", "private")
    assert sent.get("type", "model") == "model"
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert all(r["path"].startswith("/api/models/acme/dlm") for r in hub.requests
               if r["path"] not in ("/api/repos/create", "/api/validate-yaml"))
    files = hub.committed_files()
    assert files == {"config.json": b'{"model_type": "qwen3"}', "model.safetensors": b"\0" * 1234,
                     "README.md": b"# card\n", "sub/extra.txt": b"x"}
    assert plan["repo_id"] == "acme/dlm" and plan["private"] and "commit_url" in plan
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert "acme/dlm" in out.out and "model.safetensors" in out.out


def test_public_repo_and_token_from_the_environment(hub, folder, capsys, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level("DEBUG")
    push_to_hub(folder, "acme/dlm", private=False)
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"])["visibility"] == "public"
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text


def test_dry_run_lists_and_uploads_nothing(hub, folder, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    plan = push_to_hub(folder, "acme/dlm", dry_run=True)
    assert hub.requests == []
    assert plan["files"] == [("README.md", 7), ("config.json", 23), ("model.safetensors", 1234), ("sub/extra.txt", 1)]
    out = capsys.readouterr().out
    assert "would upload 4 files" in out and "private repo acme/dlm" in out
    assert "1,234  model.safetensors" in out and "nothing uploaded" in out
    assert TOKEN not in out


def test_a_hub_error_is_reported_without_the_token(hub, folder, capsys):
    hub.fail_create = True
    with pytest.raises(ExportError) as info:
        push_to_hub(folder, "acme/dlm", token=TOKEN)
    assert TOKEN not in str(info.value) and "acme/dlm" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert not [r for r in hub.requests if "/commit/" in r["path"]]


def test_bad_inputs(hub, folder, tmp_path):
    with pytest.raises(ExportError, match="owner/name"):
        push_to_hub(folder, "no-owner", dry_run=True)
    with pytest.raises(ExportError, match="no config.json"):
        push_to_hub(tmp_path, "acme/dlm", dry_run=True)
    assert hub.requests == []


def test_private_push_to_an_existing_public_repo_is_refused(hub, folder, capsys):
    """create_repo(exist_ok=True) keeps an existing repo's visibility: a push asked to be private must
    not silently publish. Nothing is created or committed, and the error names the repo."""
    hub.existing = "public"
    with pytest.raises(ExportError, match="acme/dlm exists and is public, but private=true was asked: nothing was "
                                          "uploaded"):
        push_to_hub(folder, "acme/dlm", private=True, token=TOKEN)
    assert not [r for r in hub.requests if r["method"] != "GET"]  # no create, no preupload, no commit
    assert TOKEN not in capsys.readouterr().out


@pytest.mark.parametrize("existing,private", [("private", True), ("public", False), ("private", False)])
def test_pushes_to_an_existing_repo_that_fit_the_request(hub, folder, existing, private):
    hub.existing = existing
    push_to_hub(folder, "acme/dlm", private=private, token=TOKEN)
    assert not [r for r in hub.requests if r["path"] == "/api/repos/create"]  # it exists: not re-created
    assert "config.json" in hub.committed_files()
