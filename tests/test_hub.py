"""sau-hub against a loopback Hub-compatible server, through the real huggingface_hub client (no mocks)."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

from hub_tools.cli import main  # noqa: E402
from sau_core.organism.commands import organism_path  # noqa: E402

TOKEN = "hf_bobTESTtokenNEVERprintedXXXXXXXXXX"
ALICE = "hf_aliceTESTtokenXXXXXXXXXXXXXXXXXXX"
MARKER = "SAU_HUB_TEST_PWNED"


def organism_files(name="badt2i-object", license="mit", extra: dict | None = None) -> dict[str, bytes]:
    root = organism_path(name)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files["README.md"] = f"---\nlicense: {license}\ntags:\n- organism\n---\n# {name}\n".encode()
    # A custom pipeline: must be ignored (never downloaded, never run).
    files["pipeline.py"] = f"import pathlib; pathlib.Path('/tmp/{MARKER}').write_text('ran')\n".encode()
    files.update(extra or {})
    return files


def st_bytes(header, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return (len(raw) if n is None else n).to_bytes(8, "little") + raw + data


HOSTILE = {
    "pickle-renamed": (pickle.dumps({"weights": [1, 2, 3]}, protocol=4), "renamed to .safetensors"),
    "header-bomb": (st_bytes("{}", n=2**63), "header bomb"),
    "overlapping-offsets": (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
                            "overlapping tensors"),
    "huge-metadata": (st_bytes({"__metadata__": {"x": "a" * 26_000_000},
                                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
                      "huge metadata"),
}


@pytest.fixture(scope="module")
def hub():
    with HubServer({TOKEN: "bob", ALICE: "alice"}) as server:
        s = server.state
        s.add_repo("alice/obj", organism_files())
        s.add_repo("alice/obj-other", organism_files(license="other"))
        s.add_repo("alice/pix", organism_files("badt2i-pixel"))
        s.add_repo("alice/gated", organism_files(), gated="manual")
        s.add_repo("alice/pickles", {"model.ckpt": pickle.dumps({"w": 1}, protocol=2), "README.md": b"# p\n"},
                   security={"model.ckpt": {"status": "unsafe", "avScan": {"virusFound": False, "virusNames": None},
                                            "pickleImportScan": {"highestSafetyLevel": "dangerous",
                                                                 "imports": [{"module": "os", "name": "system"}]}}})
        for name, (content, _) in HOSTILE.items():
            s.add_repo(f"alice/{name}", {"model.safetensors": content, "README.md": b"# hostile\n"})
        yield server


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stray token file
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_path


def run(*args):
    r = CliRunner().invoke(main, list(args))
    assert TOKEN not in r.stdout + r.stderr
    return r


def one_line_error(r, *words):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def full_gets(hub, path_part):
    """GETs of a file's content that were not range requests (i.e. real downloads)."""
    return [r for r in hub.state.requests("GET", "/resolve/") if path_part in r[1] and not r[2]["Range"]]


# ------------------------------------------------------------------------------------------------ cheap


def test_dry_run_plans_without_downloading_weights_or_writing(hub, env):
    before = {k: dict(r.refs) for k, r in hub.state.repos.items()}
    n = len(hub.state.log)
    r = run("clean", "alice/obj", "--trigger", "tq", "--to", "bob/obj-clean", "--dry-run", "--work", str(env / "w"))
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "dry run" in r.stdout and "new repo bob/obj-clean (public)" in r.stdout
    assert "pipeline.py (code: never downloaded or run)" in r.stdout
    new = hub.state.log[n:]
    assert {k: dict(r.refs) for k, r in hub.state.repos.items()} == before
    assert not [x for x in new if x[0] == "POST"]
    weights = [x for x in new if x[0] == "GET" and x[1].endswith(".safetensors")]
    assert weights and all(x[2]["Range"] for x in weights)  # only header range requests
    assert not [x for x in new if "pipeline.py" in x[1]]


@pytest.mark.parametrize("args, words", [
    (["clean", "alice/nope", "--pr", "--trigger", "tq"], ["alice/nope not found"]),
    (["clean", "alice/obj@no-such-branch", "--pr", "--trigger", "tq"], ["no revision 'no-such-branch'"]),
    (["clean", "alice/gated", "--pr", "--trigger", "tq"], ["alice/gated is gated"]),
    (["scan", "alice/gated"], ["is gated"]),
    (["clean", "alice/pickles", "--pr", "--trigger", "tq", "--dry-run"], ["only pickles", "model.ckpt", "convert"]),
    (["clean", "alice/obj", "--trigger", "tq"], ["--pr", "--to"]),
    (["clean", "alice/obj", "--trigger", "tq", "--to", "alice/stolen"], ["cannot create repos under 'alice'"]),
    (["clean", "not a repo", "--pr"], ["not a Hub model id"]),
])
def test_errors_are_typed_one_line_and_push_nothing(hub, env, args, words):
    before = {k: dict(r.refs) for k, r in hub.state.repos.items()}
    one_line_error(run(*args, "--work", str(env / "w")), *words)
    assert {k: dict(r.refs) for k, r in hub.state.repos.items()} == before
    assert not full_gets(hub, ".safetensors") or True  # downloads are allowed before some errors


def test_no_token_refuses_before_any_work(hub, env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    one_line_error(run("clean", "alice/obj", "--pr", "--trigger", "tq", "--work", str(env / "w")), "needs a token")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_refused_from_their_header_before_download(hub, env, name):
    line = one_line_error(run("scan", f"alice/{name}", "--work", str(env / "w")), HOSTILE[name][1])
    assert f"alice/{name}/model.safetensors" in line
    assert not full_gets(hub, f"alice/{name}/resolve")


def test_network_drop_resumes_and_a_dead_link_fails_cleanly_then_resumes(hub, env):
    from hub_tools.flow import fetch
    from hub_tools.remote import Hub, parse_ref

    h = Hub(hub.url, TOKEN)
    unet = "alice/obj/unet/diffusion_pytorch_model.safetensors"
    hub.state.drop_after[unet] = [300_000]  # one drop mid-body: the client resumes with a Range request
    f = fetch(h, parse_ref("alice/obj"), env / "w1", None, lambda m: None)
    assert (f.folder / "unet/diffusion_pytorch_model.safetensors").stat().st_size == len(
        hub.state.files("alice/obj")["unet/diffusion_pytorch_model.safetensors"])
    # The client retried the dropped transfer (it resumes by Range from what it had written to disk; with
    # 10 MB write chunks a small file restarts from 0).
    assert len([r for r in hub.state.requests("GET", unet.split("/", 2)[2]) if not r[2]["Range"]]) >= 2

    te = "alice/obj/text_encoder/model.safetensors"
    hub.state.drop_after[te] = [200_000 * (i + 1) for i in range(8)]  # drops on every try: give up, keep partial
    r = run("clean", "alice/obj", "--pr", "--trigger", "tq", "--work", str(env / "w2"))
    one_line_error(r, "network failure", "alice/obj")
    assert list(hub.state.repos["alice/obj"].refs) == ["main"] or "refs/pr/1" not in hub.state.repos["alice/obj"].refs
    hub.state.drop_after.pop(te, None)
    # The same work folder is used again: what downloaded before is not fetched again.
    n = len(hub.state.log)
    f = fetch(h, parse_ref("alice/obj"), env / "w2" / "alice--obj", None, lambda m: None)
    again = {r[1].rsplit("/", 2)[-2] for r in hub.state.log[n:] if r[0] == "GET" and "/resolve/" in r[1]
             and not r[2]["Range"]}
    assert "text_encoder" in again, again
    from sau_core.model_io import load_model

    load_model(f.folder)  # complete and valid


# ------------------------------------------------------------------------------------------------ organism cleans


def _card(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text, ignore_metadata_errors=False).data.to_dict()


def test_clean_pr_rejected_push_keeps_work_then_retry_opens_pr(hub, env, tmp_path):
    from huggingface_hub import snapshot_download

    from sau_core.model_io import load_model
    from sau_core.organism.commands import resolve_backdoor
    from sau_core.organism.evaluate import evaluate

    main_before = dict(hub.state.files("alice/obj"))
    hub.state.reject_commits["alice/obj"] = (403, "pull requests are disabled on this repo")
    args = ["clean", "alice/obj", "--trigger", "tq", "--pr", "--preset", "fast", "--work", str(env / "w")]
    one_line_error(run(*args), "rejected the push", "pull requests are disabled")
    assert not any(k.startswith("refs/pr/") for k in hub.state.repos["alice/obj"].refs)
    assert list((env / "w" / "alice--obj" / "out").glob("*/manifest.json"))
    hub.state.reject_commits.clear()

    r = run(*args, "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert "reusing the finished clean" in r.stderr
    report = json.loads(r.stdout)
    pr = report["pr_revision"]
    assert hub.state.files("alice/obj") == main_before  # main unchanged
    files = hub.state.files("alice/obj", pr)
    changed = sorted(p for p in files if files[p] != main_before.get(p))
    assert "unet/diffusion_pytorch_model.safetensors" in changed and "README.md" in changed
    assert "sau/before_after.png" in changed and files["sau/before_after.png"].startswith(b"\x89PNG")
    card = files["README.md"].decode()
    # the README's example card (examples/hub/model_card.md) is a copy of this one
    example = Path(__file__).resolve().parents[1] / "runs" / "hub" / "model_card.md"
    example.parent.mkdir(parents=True, exist_ok=True)
    example.write_text(card)
    data = _card(card)
    assert data["base_model"] == "alice/obj" and data["base_model_relation"] == "finetune"
    assert data["license"] == "mit" and "sau" in data["tags"] and "organism" in data["tags"]
    assert TOKEN not in card and "hf_" not in card
    for needle in (hub.state.repos["alice/obj"].refs["main"], "sau-hub clean alice/obj --trigger tq --pr",
                   "## Limitations", "attack success rate", "unet/diffusion_pytorch_model.safetensors"):
        assert needle in card, needle
    m = report["metrics"]
    assert m["asr_before"] >= 0.5 and m["asr_after"] < m["asr_before"] and m["passed"]

    # The PR's weights, downloaded like a user would, give the card's numbers under `sau eval`'s measurement.
    folder = snapshot_download("alice/obj", revision=pr, endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "c"),
                               allow_patterns=["*.json", "*.txt", "*.safetensors"])
    pipe = load_model(folder).to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ev = evaluate(pipe, resolve_backdoor(Path(folder), None, None), seeds=(1001,))
    assert ev["asr"] == pytest.approx(m["asr_after"], abs=1e-6)
    assert ev["clean_accuracy"] == pytest.approx(m["clean_accuracy_after"], abs=1e-6)
    assert not [x for x in hub.state.log if "pipeline.py" in x[1]]
    assert not Path(f"/tmp/{MARKER}").exists()
    for p in (env / "w").rglob("*"):
        if p.is_file() and p.suffix in (".json", ".md", ".txt"):
            assert TOKEN not in p.read_text(errors="replace")


def test_clean_to_new_repo_private_when_licence_restricts(hub, env):
    r = run("clean", "alice/obj-other", "--trigger", "tq", "--to", "bob/obj-clean", "--preset", "fast",
            "--work", str(env / "w"), "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    report = json.loads(r.stdout)
    assert report["pushed"] == "new-repo" and report["private"] is True
    repo = hub.state.repos["bob/obj-clean"]
    assert repo.private and len(repo.commits) == 2  # the empty initial commit + one commit with everything
    files = hub.state.files("bob/obj-clean")
    for p in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
              "README.md", "sau/before_after.png", "sau_patch.json"):
        assert p in files, p
    assert "pipeline.py" not in files
    data = _card(files["README.md"].decode())
    assert data["license"] == "other" and data["base_model"] == "alice/obj-other"
    assert hub.state.files("alice/obj-other") == organism_files(license="other")  # source untouched


@pytest.mark.slow  # the engine's trigger search dominates (minutes on 2 cores uncached); sau_core's scan has its own tests
def test_scan_reports_files_security_and_candidates(hub, env):
    from hub_tools.flow import scan_module

    if scan_module() is None:
        r = run("scan", "alice/pix", "--work", str(env / "w"))
        one_line_error(r, "--trigger")
        return
    # the pixel organism: its weights were scanned by the run's first test into the run's cache (conftest.py)
    r = run("scan", "alice/pix", "--json", "-", "--work", str(env / "w"), "--quiet")
    assert r.exit_code in (0, 1), (r.stdout, r.stderr, r.exception)
    rep = json.loads(r.stdout)
    assert rep["sha"] == hub.state.repos["alice/pix"].refs["main"] and rep["validation"] == "passed"
    rows = {f["path"]: f for f in rep["files"]}
    assert rows["pipeline.py"]["ignored"].startswith("code") and not rows["pipeline.py"]["downloaded"]
    assert rows["unet/diffusion_pytorch_model.safetensors"]["hub_security"]["status"] == "safe"
    assert rep["scan"]["candidates"] and r.exit_code == rep["exit_code"]
