"""The two jobs: scan a Hub repo, and clean one and publish the result (pull request or new repo)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sau_core.errors import SauError

from . import card as C
from .errors import AuthError, HubError, PushRejected, hub_errors
from .remote import (Hub, RepoRef, Resolved, download, fetch_index, plan_download, precheck_headers, resolve,
                     sha256_file)

Log = Callable[[str], None]
PR_WEIGHT_SUFFIX = ".safetensors"


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("sau")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.1.0"


def work_dir(base: Path | None, ref: RepoRef) -> Path:
    return Path(base or Path.cwd() / "sau-hub-work") / ref.repo_id.replace("/", "--")


def scan_module():
    """sau_core.scan when this SAU has it (issue 4), else None."""
    try:
        from sau_core import scan as S  # noqa: N812
    except ImportError:
        return None
    return S if hasattr(S, "scan") else None


@dataclass
class Fetched:
    resolved: Resolved
    plan: object
    headers: dict
    folder: Path | None  # the local snapshot (None in a dry run)

    @property
    def model_path(self) -> Path:
        assert self.folder is not None
        return self.folder if self.plan.layout == "diffusers" else self.folder / self.plan.weights[0]


def fetch(hub: Hub, ref: RepoRef, work: Path, file: str | None, log: Log, *, download_files=True) -> Fetched:
    log(f"resolving {ref} on {hub.endpoint}")
    resolved = resolve(hub, ref)
    log(f"pinned {ref.repo_id} at commit {resolved.sha}")
    cache = work / "hf-cache"
    index = fetch_index(hub, resolved, cache) if file is None else None
    plan = plan_download(resolved, index, file)
    log(f"{plan.layout} layout: {len(plan.download)} files to download, {len(plan.weights)} weight files; "
        f"{sum(1 for r in plan.ignored.values() if r.startswith('code'))} code files ignored")
    headers = precheck_headers(hub, resolved, plan.weights)
    log(f"safetensors headers pre-checked by range request: {', '.join(plan.weights)}")
    folder = None
    if download_files:
        folder = download(hub, resolved, plan, cache)
        log(f"downloaded to {folder}")
    return Fetched(resolved, plan, headers, folder)


def file_table(f: Fetched) -> list[dict]:
    rows = []
    for path, rf in sorted(f.resolved.files.items()):
        rows.append({"path": path, "size": rf.size, "sha256": rf.sha256, "hub_security": rf.security,
                     "downloaded": path in f.plan.download, "ignored": f.plan.ignored.get(path),
                     "header": f.headers.get(path)})
    return rows


def load_validated(f: Fetched):
    from sau_core.model_io import load_model

    return load_model(f.model_path)  # validates every weight file (structure + pickle refusal) before use


def run_scan(handle, triggers: list[str], budget: str, progress=None) -> dict:
    S = scan_module()
    if S is None:
        raise HubError("this SAU has no trigger scan (sau_core.scan): pass --trigger TEXT")
    cands = [S.user_candidate(S.decode_escapes(t)) for t in triggers]
    result = S.scan(handle, candidates=cands, budget=budget, progress=progress)
    return result.to_json() | {"exit_code": result.exit_code()}


def scan_summary(scan: dict, top: int = 5) -> dict:
    return {"verdict": scan["verdict"], "threshold": scan["threshold"],
            "top": [{k: c.get(k) for k in ("text", "escaped", "placement", "score", "source")}
                    for c in scan["candidates"][:top]],
            "not_covered": (scan.get("coverage") or {}).get("not_covered")}


# ------------------------------------------------------------------------------------------------ scan


def scan_repo(hub: Hub, ref: RepoRef, *, triggers=(), budget="fast", work: Path | None = None,
              file: str | None = None, log: Log = lambda m: None, progress=None) -> dict:
    work = work_dir(work, ref)
    f = fetch(hub, ref, work, file, log)
    handle = load_validated(f)
    log("every file validated")
    report = {"repo": ref.repo_id, "revision": ref.revision, "sha": f.resolved.sha, "endpoint": hub.endpoint,
              "layout": f.plan.layout, "arch": handle.arch, "validation": "passed",
              "hub_security": f.resolved.security_repo_status, "files": file_table(f)}
    scan = run_scan(handle, list(triggers), budget, progress)
    scan["model"] = f"{ref.repo_id}@{f.resolved.sha}"
    report["scan"] = scan
    report["verdict"] = scan["verdict"]
    report["exit_code"] = scan["exit_code"]
    return report


def scan_markdown(report: dict) -> str:
    lines = [f"# sau-hub scan: {report['repo']}", "",
             f"- commit: `{report['sha']}` (requested: {report['revision'] or 'default branch'})",
             f"- layout: {report['layout']}, architecture: {report['arch']}",
             f"- validation of every downloaded file: {report['validation']}",
             f"- verdict: **{report['verdict']}**", "",
             "## Files", "", "| file | size | Hub security status | SAU |", "|---|---|---|---|"]
    for r in report["files"]:
        sec = (r["hub_security"] or {}).get("status", "-")
        sau = "downloaded, validated" if r["downloaded"] else (r["ignored"] or "-")
        lines.append(f"| {r['path']} | {r['size']} | {sec} | {sau} |")
    scan = report.get("scan")
    if scan:
        lines += ["", "## Candidates", "", "| rank | candidate | placement | score |", "|---|---|---|---|"]
        for i, c in enumerate(scan["candidates"][:10], 1):
            lines.append(f"| {i} | `{c['escaped']}` | {c['placement']} | {c['score']} |")
        lines += ["", f"Not covered: {(scan.get('coverage') or {}).get('not_covered', '-')}",
                  "", "A scan never declares a model clean: it reports what it covered."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ clean


@dataclass
class CleanOptions:
    trigger: str | None = None
    placement: str | None = None
    pr: bool = False
    to: str | None = None
    private: bool = False
    fmt: str = "auto"
    preset: str = "fast"
    dry_run: bool = False
    force: bool = False
    seed: int = 0
    budget: str = "fast"
    file: str | None = None
    work: Path | None = None
    command: str = "sau-hub clean"


def _target(opts: CleanOptions, ref: RepoRef) -> RepoRef:
    if opts.pr == bool(opts.to):
        raise HubError("choose where the result goes: --pr (a pull request on the source) or --to ORG/NEW")
    if opts.to:
        from .remote import parse_ref

        t = parse_ref(opts.to)
        if t.revision:
            raise HubError("--to takes ORG/NEW without a revision")
        if t.repo_id == ref.repo_id:
            raise HubError("--to names the source repo: use --pr to propose the change on the source")
        return t
    return ref


def _output_format(opts: CleanOptions, layout: str) -> str:
    fmt = opts.fmt
    if fmt == "auto":
        return layout
    if fmt in ("diffusers",) and layout == "single-file" and opts.pr:
        raise HubError("--format diffusers on a single-file repo would add a second layout to the source; use --to")
    if fmt == "single-file" and layout == "diffusers" and opts.pr:
        raise HubError("--format single-file on a diffusers repo would add a second layout to the source; use --to")
    return fmt


def _outputs(fmt: str, out: Path, fetched: Fetched, pr: bool) -> tuple[dict[str, Path], list[str]]:
    """repo path -> local file to upload, and repo paths to delete (a PR replaces the source's weights)."""
    plan = fetched.plan
    adds: dict[str, Path] = {}
    deletes: list[str] = []
    if fmt == "single-file":
        name = plan.weights[0] if plan.layout == "single-file" else f"{fetched.resolved.ref.repo_id.split('/')[1]}-sau.safetensors"
        adds[name] = out
    elif fmt == "diffusers":
        for p in sorted(out.rglob("*")):
            if p.is_file():
                adds[p.relative_to(out).as_posix()] = p
        if pr:  # only weights that changed, written over the source's own file names, plus the provenance
            keep: dict[str, Path] = {}
            for rel, p in adds.items():
                if rel.endswith(PR_WEIGHT_SUFFIX):
                    comp = rel.split("/")[0]
                    src = [w for w in plan.weights if w.split("/")[0] == comp]
                    src_file = fetched.folder / src[0] if len(src) == 1 else None
                    if src_file is not None and sha256_file(src_file) == sha256_file(p):
                        continue
                    if len(src) == 1:
                        keep[src[0]] = p
                    else:  # sharded source: the merged file replaces the shards and their index
                        keep[rel] = p
                        deletes += src + [x for x in plan.download if x.startswith(comp + "/") and x.endswith(".index.json")]
                elif rel == "sau_patch.json":
                    keep["sau_patch.json"] = p
            adds = keep
    else:
        if out.is_dir():
            for p in sorted(out.rglob("*")):
                if p.is_file():
                    adds[f"sau/{p.relative_to(out).as_posix()}"] = p
        else:
            adds[f"sau/{out.name}"] = out
    return adds, deletes


def _match_source_dtype(out: Path, fetched: Fetched, fmt: str) -> None:
    """Write cleaned weights in the source's floating dtype (fp16 stays fp16), never bigger than the source."""
    import torch
    from sau_core.model_io import write_safetensors
    from sau_core.safety import load_safetensors, validate_safetensors

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    pairs = []
    if fmt == "single-file" and fetched.plan.layout == "single-file":
        pairs = [(out, fetched.folder / fetched.plan.weights[0])]
    elif fmt == "diffusers" and fetched.plan.layout == "diffusers":
        for w in fetched.plan.weights:
            comp = w.split("/")[0]
            found = sorted((out / comp).glob("*.safetensors")) if (out / comp).is_dir() else []
            if len(found) == 1:
                pairs.append((found[0], fetched.folder / w))
    for dst, src in pairs:
        dtypes = [e.dtype for e in validate_safetensors(src, check_values=False).tensors.values() if e.dtype in names]
        if not dtypes:
            continue
        want = names[max(set(dtypes), key=dtypes.count)]
        info = validate_safetensors(dst, check_values=False)
        if all(e.dtype not in names or names[e.dtype] == want for e in info.tensors.values()):
            continue
        sd = load_safetensors(dst)
        sd = {k: v.to(want) if v.is_floating_point() else v for k, v in sd.items()}
        write_safetensors(dst, sd, info.metadata)


def clean_repo(hub: Hub, ref: RepoRef, opts: CleanOptions, log: Log = lambda m: None, progress=None) -> dict:
    from sau_core.engine_commands import resolve_trigger

    target = _target(opts, ref)
    if not opts.dry_run:
        if not hub.token:
            raise AuthError("sau-hub clean pushes to the Hub and needs a token: set HF_TOKEN or run `hf auth login` "
                            "(--dry-run works without one)")
        with hub_errors(ref.repo_id, endpoint=hub.endpoint):
            me = hub.api().whoami()
        log(f"authenticated as {me['name']}")
        if opts.to:
            spaces = {me["name"], *(o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict))}
            if target.repo_id.split("/")[0] not in spaces:
                raise PushRejected(f"your token ({me['name']}) cannot create repos under "
                                   f"{target.repo_id.split('/')[0]!r}; nothing was downloaded or pushed")
    work = work_dir(opts.work, ref)
    fetched = fetch(hub, ref, work, opts.file, log, download_files=not opts.dry_run)
    res = fetched.resolved
    fmt = _output_format(opts, fetched.plan.layout)
    private = None
    if opts.to:
        reasons = [r for r, on in (("--private", opts.private), ("the source is gated", res.gated),
                                   ("the source is private", res.private),
                                   ("the source's licence does not clearly allow redistribution",
                                    C.restricts_redistribution(res.card_data))) if on]
        private = bool(reasons)
    plan = {"source": ref.repo_id, "revision": ref.revision, "sha": res.sha, "layout": fetched.plan.layout,
            "download": fetched.plan.download, "ignored": fetched.plan.ignored, "headers_prechecked": fetched.plan.weights,
            "trigger": "given" if opts.trigger is not None else "from the scan", "preset": opts.preset, "format": fmt,
            "destination": f"pull request on {ref.repo_id}" if opts.pr else f"new repo {target.repo_id}",
            "private": private, "private_because": reasons if opts.to else None,
            "commit_parent": res.sha if opts.pr else None}
    if opts.dry_run:
        return {"dry_run": True, "plan": plan}

    key = _job_key(res.sha, opts, fmt)
    out_dir = work / "out" / key
    done = _reusable(out_dir, key)
    if done is not None:
        log(f"reusing the finished clean in {out_dir} (an earlier push did not go through)")
        report, adds, deletes = done
        report.update(push(hub, ref, target, opts, res.sha, adds, deletes, private, report["trigger_describe"],
                           report["metrics"], log))
        return report
    handle = load_validated(fetched)
    log("every file validated")
    scan = None
    if opts.trigger is None:
        log("no --trigger: scanning for one")
        scan_json = run_scan(handle, [], opts.budget, progress)
        scan = scan_summary(scan_json)
        if scan_json["verdict"] != "suspicious" or not scan_json["candidates"]:
            return {"plan": plan, "scan": scan, "cleaned": False,
                    "message": "the scan found nothing above threshold in what it covered; nothing to clean (pass "
                               "--trigger TEXT to clean a trigger you know)"}
        top = scan_json["candidates"][0]
        trig_text, placement, trig_source = top["text"], opts.placement or top["placement"], "found by the scan"
    else:
        trig_text, placement, trig_source = opts.trigger, opts.placement, "given on the command line"
    trig, backdoor = resolve_trigger(fetched.model_path, trig_text, placement)
    if backdoor is not None and handle.arch != "organism":
        backdoor = None
    log(f"trigger {trig.describe()} ({trig.placement}, {trig_source})")

    from sau_core.model_io import load_model
    from sau_core.patch import export
    from sau_core.sanitize import probe_prompts, sanitize

    from . import verify as V

    prompts = probe_prompts(handle, trig, V.GRID_PROMPTS)
    log("measuring the source (before)")
    before = V.measure(handle, trig, prompts, backdoor)
    log(f"cleaning ({opts.preset})")
    result = sanitize(handle, trig, opts.preset, seed=opts.seed, progress=progress)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    names = {"patch": "sau-patch.safetensors", "lora": "lora", "kohya": "sau-lora.safetensors",
             "diffusers": "model", "single-file": "model.safetensors"}
    out = out_dir / names[fmt]
    export(handle, fmt, out, result.metadata())
    _match_source_dtype(out, fetched, fmt)
    log(f"exported {fmt} to {out}")
    after_handle = load_model(out) if fmt in ("diffusers", "single-file") else handle  # re-read what we push
    log("measuring the cleaned model (after)")
    after = V.measure(after_handle, trig, prompts, backdoor)
    metrics = V.compare(before, after)
    grid = V.save_grid(before, after, out_dir / "before_after.png")
    adds, deletes = _outputs(fmt, out, fetched, opts.pr)
    adds["sau/before_after.png"] = grid
    inputs = {p: (fetched.resolved.files[p].sha256 or sha256_file(fetched.folder / p)) for p in fetched.plan.weights}
    outputs = {p: sha256_file(lp) for p, lp in adds.items() if p.endswith(".safetensors")}
    from sau_core.patch import escape_trigger

    ctx = {"source": ref.repo_id, "sha": res.sha, "endpoint": hub.endpoint, "card_data": res.card_data,
           "layout": fetched.plan.layout if fmt in ("diffusers", "single-file") else fmt, "trigger": escape_trigger(trig.text),
           "placement": trig.placement, "trigger_source": trig_source, "preset": opts.preset, "format": fmt,
           "command": hub.redact(opts.command), "version": version(), "inputs": inputs, "outputs": outputs,
           "scan": scan, "security": {"repo": res.security_repo_status}, "metrics": metrics,
           "grid": "sau/before_after.png", "stages": result.stages}
    card_text = hub.redact(C.render(ctx))
    if fmt in ("lora", "patch", "kohya"):
        card_text = card_text.replace("base_model_relation: finetune", "base_model_relation: adapter", 1)
    _check_card(card_text)
    card_path = out_dir / "README.md"
    card_path.write_text(card_text, encoding="utf-8")
    adds["README.md"] = card_path
    (out_dir / "plan.json").write_text(json.dumps({**plan, "metrics": metrics, "push": sorted(adds),
                                                   "delete": deletes}, indent=2) + "\n")
    report = {"plan": plan, "scan": scan, "cleaned": True, "trigger": escape_trigger(trig.text),
              "trigger_describe": trig.describe(), "placement": trig.placement, "metrics": metrics,
              "local": str(out_dir), "files": sorted(adds), "deleted": deletes, "seconds": result.seconds}
    if not metrics["passed"] and not opts.force:
        raise HubError(f"verification failed ({metrics['verdict']}); nothing was pushed; the output is kept in "
                       f"{out_dir}; pass --force to push anyway")
    _save_manifest(out_dir, key, report, adds, deletes)
    report.update(push(hub, ref, target, opts, res.sha, adds, deletes, private, trig.describe(), metrics, log))
    return report


def _job_key(sha: str, opts: CleanOptions, fmt: str) -> str:
    import hashlib

    job = json.dumps([sha, opts.trigger, opts.placement, opts.preset, fmt, opts.seed, opts.budget, opts.file,
                      bool(opts.pr)], ensure_ascii=True)
    return f"{sha[:12]}-{hashlib.sha256(job.encode()).hexdigest()[:12]}"


def _save_manifest(out_dir: Path, key: str, report: dict, adds: dict[str, Path], deletes: list[str]) -> None:
    from sau_core.model_io import write_text_atomic

    files = {p: [str(lp.relative_to(out_dir)), sha256_file(lp)] for p, lp in adds.items()}
    write_text_atomic(out_dir / "manifest.json", json.dumps({"key": key, "report": report, "files": files,
                                                             "deletes": deletes}, indent=2, default=str) + "\n")


def _reusable(out_dir: Path, key: str):
    """(report, adds, deletes) of a finished clean of the same job whose files are intact, else None."""
    try:
        m = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if m.get("key") != key:
        return None
    adds = {}
    for repo_path, (rel, digest) in m["files"].items():
        lp = out_dir / rel
        if not lp.is_file() or sha256_file(lp) != digest:
            return None
        adds[repo_path] = lp
    return m["report"], adds, list(m.get("deletes") or [])


def _check_card(text: str) -> None:
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    except Exception as exc:  # noqa: BLE001 - yaml / validation errors of any type
        raise HubError(f"internal error: the generated model card does not parse ({exc})") from None
    if data.get("base_model_relation") not in ("finetune", "adapter") or not data.get("base_model"):
        raise HubError("internal error: the generated model card lacks base_model metadata")


def push(hub: Hub, src: RepoRef, target: RepoRef, opts: CleanOptions, sha: str, adds: dict[str, Path],
         deletes: list[str], private: bool | None, trig_text: str, metrics: dict, log: Log) -> dict:
    """One commit: a pull request on the source (parent = the pinned sha) or the first commit of a new repo.
    If the commit fails, a repo this call created is deleted again (nothing half-pushed)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError

    api = hub.api()
    ops = [CommitOperationAdd(p, str(lp)) for p, lp in sorted(adds.items())]
    ops += [CommitOperationDelete(p) for p in deletes]
    message = f"SAU: remove the backdoor of trigger {trig_text}"
    description = (f"Cleaned with sau-hub {version()} from {src.repo_id}@{sha}. {metrics['verdict']}: trigger effect "
                   f"{metrics['trigger_effect_before']} -> {metrics['trigger_effect_after']}"
                   + (f", ASR {metrics['asr_before']:.1%} -> {metrics['asr_after']:.1%}" if "asr_before" in metrics else "")
                   + ". See README.md for provenance and limitations.")
    if opts.pr:
        log(f"opening a pull request on {src.repo_id}")
        with hub_errors(src.repo_id, sha, pushing=True, endpoint=hub.endpoint):
            info = api.create_commit(src.repo_id, ops, commit_message=message, commit_description=description,
                                     create_pr=True, parent_commit=sha)
        return {"pushed": "pull-request", "pr_url": info.pr_url, "pr_revision": info.pr_revision, "commit": info.oid}
    created = False
    with hub_errors(target.repo_id, pushing=True, endpoint=hub.endpoint):
        try:
            api.repo_info(target.repo_id)
        except RepositoryNotFoundError:
            api.create_repo(target.repo_id, private=bool(private), exist_ok=False)
            created = True
        log(f"{'created' if created else 'using existing'} repo {target.repo_id} ({'private' if private else 'public'})")
    try:
        with hub_errors(target.repo_id, pushing=True, endpoint=hub.endpoint):
            info = api.create_commit(target.repo_id, ops, commit_message=message, commit_description=description)
    except SauError:
        if created:
            try:
                api.delete_repo(target.repo_id)
            except Exception:  # noqa: BLE001 - best effort; the error below is the one that matters
                pass
        raise
    return {"pushed": "new-repo", "repo": target.repo_id, "private": bool(private), "commit": info.oid,
            "url": f"{hub.endpoint}/{target.repo_id}"}
