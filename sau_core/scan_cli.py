"""`sau scan`, `sau check` and `sau scan-bench`.

Exit codes (scan and check): 0 nothing above threshold in what was covered, 1 suspicious, 2 error.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .cli import main
from .errors import SauError
from . import scan as S
from .trigger import escape


def _load(model: str, what: str = "model"):
    import torch

    from .model_io import load_model
    from .organism.commands import organism_path

    torch.set_flush_denormal(True)
    path = organism_path(model)
    handle = load_model(path)  # validates every file before use; pickles are refused
    if handle.is_xl:
        raise SauError(f"{what} {model}: scanning SDXL models is not implemented yet")
    return handle


def _bar(enabled: bool):
    from .engine_commands import StageProgress

    return StageProgress(enabled)


@main.command("scan")
@click.argument("model")
@click.option("--trigger", "triggers", multiple=True, help="A candidate trigger to test (repeatable; unicode "
              "as is or escaped, e.g. '\\u200b').")
@click.option("--candidates", "cand_file", type=click.Path(path_type=Path), default=None,
              help="A UTF-8 file with one candidate per line.")
@click.option("--reference", default=None, help="A trusted model of the same architecture to compare with.")
@click.option("--budget", type=click.Choice(sorted(S.BUDGETS)), default="fast", show_default=True,
              help="fast: UNet evidence on a vocabulary sample; full: on the whole vocabulary (slow).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the full result (candidates, evidence, coverage) as JSON here ('-': stdout).")
@click.option("--heatmaps", type=click.Path(path_type=Path), default=None,
              help="Folder for the top candidates' attention heatmaps (PNG).")
@click.option("--top", default=10, show_default=True, help="How many candidates to print.")
@click.option("--no-cache", is_flag=True, help="Recompute everything (the cache lives in $SAU_CACHE or ~/.cache/sau).")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the vocabulary sample, the random-string nulls and the probe noise.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: when a terminal).")
def scan_cmd(model, triggers, cand_file, reference, budget, json_out, heatmaps, top, no_cache, seed, progress):
    """Search MODEL for an unknown trigger. Prints ranked candidates, coverage and a verdict; never "clean".

    Exit codes: 0 nothing above threshold in what was covered, 1 suspicious, 2 error."""
    cands = [S.user_candidate(S.decode_escapes(t)) for t in triggers]
    if cand_file is not None:
        cands += S.read_candidates(cand_file)
    handle = _load(model)
    ref = _load(reference, "reference") if reference else None
    if ref is not None and (ref.unet.config.cross_attention_dim != handle.unet.config.cross_attention_dim
                            or len(ref.tokenizer) != len(handle.tokenizer)):
        raise SauError("the reference model's architecture differs from the model's (text width or vocabulary)")
    bar = _bar(sys.stderr.isatty() if progress is None else progress)
    try:
        result = S.scan(handle, candidates=cands, reference=ref, budget=budget, progress=bar,
                        use_cache=not no_cache, heatmaps=str(heatmaps) if heatmaps else None, seed=seed)
    finally:
        bar.close()
    result.model = str(model)
    data = result.to_json()
    if json_out is not None:
        text = json.dumps(data, indent=2, ensure_ascii=True)
        if str(json_out) == "-":
            click.echo(text)
        else:
            from .model_io import write_text_atomic

            write_text_atomic(json_out, text + "\n")
    if json_out is None or str(json_out) != "-":
        _print_scan(result, top)
    sys.exit(result.exit_code())


def _print_scan(result: S.ScanResult, top: int) -> None:
    click.echo(f"scan of {result.model} ({result.settings['budget']}, {result.seconds['total']:.1f} s)")
    click.echo(f"{'rank':>4}  {'score':>6}  {'candidate':24s} {'placement':11s} {'source':28s} evidence (z; scored: common, toward once images confirm it, pair synergy, reference)")
    for i, c in enumerate(result.candidates[:top], 1):
        ev = " ".join(f"{k}={v:+.1f}" for k, v in c["z"].items())
        click.echo(f"{i:>4}  {c['score']:>6.1f}  {c['escaped'][:24]:24s} {c['placement']:11s} {c['source'][:28]:28s} {ev}")
    cov = result.coverage
    click.echo(f"covered: text encoder on all {cov['text_sweep_tokens']} vocabulary tokens; UNet on "
               f"{cov['unet_probe_vocabulary_tokens']} vocabulary tokens, {cov['zoo_and_user_strings']} zoo/user "
               f"strings, {cov['homoglyph_swaps']} homoglyph swaps, {cov['pairs']} pairs")
    if result.known:
        click.echo("known words (the probe prompts' own; they steer the image by design, not ranked): "
                   + ", ".join(f"{c['escaped']} {c['score']:.1f}" for c in result.known[:6]))
    click.echo(f"not covered: {cov['not_covered']}")
    click.echo(f"verdict: {result.verdict} (threshold z >= {result.threshold})")


@main.command("check")
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True, help="The prompt to check (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--no-cache", is_flag=True)
def check_cmd(model, prompts, as_json, no_cache):
    """Does PROMPT fire a backdoor in MODEL? Each word of the prompt (and each non-ASCII letter, as a
    homoglyph) is scored like a scan candidate against the vocabulary's own distribution; the prompt's
    attention assimilation is reported. Exit codes: 0 nothing above threshold, 1 suspicious, 2 error."""
    for p in prompts:
        if not p.strip():
            raise SauError("empty prompt")
    handle = _load(model)
    checker = S.PromptChecker(handle, use_cache=not no_cache)
    results = [checker.check(p) for p in prompts]
    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=True))
    else:
        for r in results:
            worst = r["pieces"][0] if r["pieces"] else None
            what = f" (worst: {worst['escaped']} score {worst['score']:.1f})" if worst else ""
            click.echo(f"{r['verdict']}: {r['escaped_prompt']}{what}")
    sys.exit(S.EXIT_SUSPICIOUS if any(r["suspicious"] for r in results) else S.EXIT_NOTHING)


@main.command("scan-bench")
@click.option("--organisms", default="all", show_default=True, help="Comma-separated organism names.")
@click.option("--budget", type=click.Choice(sorted(S.BUDGETS)), default="fast", show_default=True)
@click.option("--check-prompts", default=4, show_default=True,
              help="Held-out prompts per organism for the prompt-check F1 (each with and without trigger).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the JSON results here; rows of organisms not scanned this time are kept from it.")
@click.option("--no-cache", is_flag=True)
@click.option("--seed", default=0, show_default=True,
              help="Seed of the vocabulary sample, the random-string nulls and the probe noise.")
@click.option("--organism-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Scan the organisms built into this folder (`sau organism build --out DIR`, e.g. another "
              "build seed) instead of the built-in ones; each one's backdoor is read from its organism.json.")
def scan_bench_cmd(organisms, budget, check_prompts, out, no_cache, seed, organism_dir):
    """Scan every built-in organism, print the detection table (Markdown) that the README shows.

    With --out, rows already in that file for other organisms stay (as `sau bench` keeps other attacks' rows),
    so rebuilding one organism means re-scanning only that one; the table printed covers them all."""
    from .organism.commands import organism_folders, resolve_backdoor

    folders = organism_folders(organism_dir, None if organisms == "all"
                               else [n.strip() for n in organisms.split(",") if n.strip()])
    names = [f.name for f in folders]
    kept = []  # read before scanning, so a bad file fails at once
    if out and out.is_file():
        try:
            kept = [r for r in json.loads(out.read_text()) if r["organism"] not in names]
        except (ValueError, TypeError, KeyError) as e:
            raise SauError(f"{out}: not a scan-bench results file ({e})") from None
    rows = []
    for folder in folders:
        handle = _load(str(folder))
        t0 = time.time()
        r = S.scan(handle, budget=budget, use_cache=not no_cache, seed=seed)
        bd = resolve_backdoor(folder, None, None)
        rank = r.rank_of(bd.trigger) if bd else None
        row = {"organism": folder.name, "seed": seed, "trigger": escape(bd.trigger) if bd else "-",
               "rank": rank, "verdict": r.verdict, "top": r.candidates[0]["escaped"],
               "top_score": r.candidates[0]["score"], "true_score": r.candidates[rank - 1]["score"] if rank else None,
               "seconds": round(time.time() - t0, 1), "text_sweep_tokens_per_s": r.seconds.get("text_sweep_tokens_per_s")}
        if organism_dir is not None:
            row["organism_dir"] = str(organism_dir)
        if bd is not None:  # does the top candidate fire the backdoor? (a leaky backdoor has several triggers)
            row.update(fire_rates(handle, bd, r.candidates[0]))
        if check_prompts:
            row["check"] = S.check_benchmark(handle, bd, check_prompts)
        rows.append(row)
        click.echo(json.dumps(row, ensure_ascii=True), err=True)
    if kept:
        rows = sorted(rows + kept, key=lambda r: r["organism"])
    click.echo(bench_table(rows))
    if out:
        from .model_io import write_text_atomic

        write_text_atomic(out, json.dumps(rows, indent=2, ensure_ascii=True) + "\n")


def fire_rates(handle, backdoor, top: dict) -> dict:
    """The backdoor's firing rate on held-out prompts with no trigger, with the true trigger and with the
    scan's top candidate put in the way the scan placed it."""
    from .organism.evaluate import fire_rate

    pipe = handle.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cand = S.Candidate(top["text"], top["source"], top["placement"])
    return {"fires_untriggered": fire_rate(pipe, backdoor, lambda p: p),
            "fires_trigger": fire_rate(pipe, backdoor, backdoor.triggered),
            "fires_top": fire_rate(pipe, backdoor, lambda p: S.Prompter(handle.tokenizer, [p]).text(cand, 0))}


def bench_table(rows: list[dict]) -> str:
    lines = ["| organism | trigger | rank of true trigger | true score | top candidate (score) | verdict | "
             "backdoor fires: none / trigger / top | check TP/FN/FP/TN | scan s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("check")
        ch = f"{c['tp']}/{c['fn']}/{c['fp']}/{c['tn']}" if c else "-"
        fires = (f"{r['fires_untriggered']:.0%} / {r['fires_trigger']:.0%} / {r['fires_top']:.0%}"
                 if "fires_top" in r else "-")
        lines.append(f"| {r['organism']} | `{r['trigger']}` | {r['rank'] if r['rank'] else '-'} | "
                     f"{r['true_score'] if r['true_score'] is not None else '-'} | `{r['top']}` ({r['top_score']}) | "
                     f"{r['verdict']} | {fires} | {ch} | {r['seconds']} |")
    return "\n".join(lines)
