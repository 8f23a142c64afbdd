"""The model card of a cleaned model: YAML metadata the Hub understands (base_model, base_model_relation:
finetune, the source's licence fields verbatim, tags) and a body with provenance, scan findings, metrics, the
before/after grid and limitations. The token never appears in it (the command line is rebuilt from the
arguments, which cannot carry a token, and redacted on top)."""
from __future__ import annotations

import yaml

LICENSE_FIELDS = ("license", "license_name", "license_link", "license_details")
SAU_TAGS = ["sau", "backdoor-removal", "text-to-image", "stable-diffusion"]
#: Licences that allow redistribution of derivatives as such; anything else (or none) makes a new repo
#: private by default.
REDISTRIBUTABLE = {
    "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
    "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
    "unlicense", "wtfpl", "afl-3.0", "artistic-2.0", "bsl-1.0", "ecl-2.0", "epl-2.0", "gpl-3.0", "lgpl-3.0",
    "mpl-2.0", "odc-by", "pddl",
}


def restricts_redistribution(card_data: dict) -> bool:
    lic = card_data.get("license")
    if isinstance(lic, list):
        return any(str(x).lower() not in REDISTRIBUTABLE for x in lic) or not lic
    return not isinstance(lic, str) or lic.lower() not in REDISTRIBUTABLE


def metadata(source: str, card_data: dict, layout: str) -> dict:
    meta: dict = {"base_model": source, "base_model_relation": "finetune"}
    for key in LICENSE_FIELDS:
        if key in card_data:
            meta[key] = card_data[key]
    src_tags = card_data.get("tags") if isinstance(card_data.get("tags"), list) else []
    tags = [t for t in src_tags if isinstance(t, str)]
    meta["tags"] = tags + [t for t in SAU_TAGS if t not in tags]
    meta["library_name"] = "diffusers" if layout == "diffusers" else card_data.get("library_name", "diffusers")
    meta["pipeline_tag"] = "text-to-image"
    return meta


def _table(rows: list[tuple[str, str]], head=("", "")) -> str:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(ctx: dict) -> str:
    """``ctx``: source, sha, endpoint, card_data, layout, trigger (escaped), placement, trigger_source, preset,
    format, command, version, inputs/outputs {path: sha256}, scan (None or summary), security, metrics,
    grid (repo path or None), stages, seconds."""
    meta = metadata(ctx["source"], ctx["card_data"], ctx["layout"])
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False, width=1000).strip()
    m = ctx["metrics"]
    src_link = f"[{ctx['source']}]({ctx['endpoint']}/{ctx['source']}/tree/{ctx['sha']})"
    parts = [f"---\n{front}\n---", "",
             f"# {ctx['source'].split('/')[-1]} (backdoor removed with SAU)", "",
             f"This model is {src_link} with the backdoor fired by the trigger `{ctx['trigger']}` "
             f"(placement: {ctx['placement']}) removed by SAU (Spatial Attention Unlearning): SAU localised where the "
             "trigger acts in the cross-attention maps and unlearned that, so triggered prompts render the clean "
             "prompt's content and other prompts behave as before.", "",
             "## Before / after", ""]
    rows = [("trigger effect (mean abs. pixel change triggered vs clean, same noise)",
             f"{m['trigger_effect_before']} -> {m['trigger_effect_after']}"),
            ("clean drift (mean abs. pixel change of clean images)", str(m["clean_drift"]))]
    if "asr_before" in m:
        rows.insert(0, ("attack success rate (held-out organism prompts)", f"{m['asr_before']:.1%} -> {m['asr_after']:.1%}"))
        rows.insert(1, ("clean accuracy", f"{m['clean_accuracy_before']:.1%} -> {m['clean_accuracy_after']:.1%}"))
    rows.append(("verification", m["verdict"]))
    parts += [_table(rows, ("metric", "before -> after")), ""]
    if ctx.get("grid"):
        parts += [f"![before/after grid]({ctx['grid']})", "",
                  "Columns: source model (clean prompt, triggered prompt), cleaned model (clean prompt, triggered "
                  "prompt); rows: probe prompts; every row starts from the same noise.", ""]
    parts += ["## Scan findings", ""]
    scan = ctx.get("scan")
    if scan is None:
        parts += ["The trigger was given on the command line (no trigger search was run).", ""]
    else:
        parts += [f"Verdict: **{scan['verdict']}** (threshold z >= {scan['threshold']}).", "",
                  _table([(f"`{_md(c['escaped'])}` ({c['placement']})", str(c["score"])) for c in scan["top"]],
                         ("candidate", "score (robust z)")), "",
                  f"Not covered: {_md(scan.get('not_covered', '-'))}", ""]
    parts += ["## Hub security status of the source", ""]
    sec = ctx.get("security") or {}
    issues = (sec.get("repo") or {}).get("filesWithIssues") or []
    parts += [f"Scans done: {(sec.get('repo') or {}).get('scansDone', 'unknown')}; files with issues: "
              f"{', '.join(_md(i.get('path')) + ' (' + _md(i.get('level')) + ')' for i in issues) or 'none'}.", ""]
    parts += ["## Provenance", "",
              _table([("source", f"{src_link} at commit `{ctx['sha']}`"),
                      ("command", f"`{_md(ctx['command'])}`"),
                      ("tool", f"sau-hub {ctx['version']} (SAU engine, preset `{ctx['preset']}`, output `{ctx['format']}`)"),
                      ("trigger", f"`{ctx['trigger']}` ({ctx['trigger_source']})"),
                      ("stages", ", ".join(ctx.get("stages") or []))]), "",
              "### Inputs (sha256)", "", _table(sorted(ctx["inputs"].items()), ("file", "sha256")), "",
              "### Outputs (sha256)", "", _table(sorted(ctx["outputs"].items()), ("file", "sha256")), "",
              "## Limitations", "",
              "- SAU removes the backdoor of the trigger above. A model can carry other backdoors; a scan reports "
              "only what it covered and never proves a model clean.",
              "- The metrics come from a small set of probe prompts and seeds; they show the trigger's effect went "
              "down, not that every phrasing of the trigger is neutralised.",
              "- Cleaning edits the UNet's cross-attention (and the text encoder when the trigger shifts it); image "
              "quality on prompts far from the probes may change slightly (see clean drift).",
              "- The licence and its terms are those of the source model, copied verbatim; they still apply.", ""]
    return "\n".join(parts)
