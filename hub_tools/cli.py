"""`sau-hub`: scan and clean Hugging Face Hub models.

Exit codes: scan 0 nothing above threshold in what was covered, 1 suspicious, 2 error; clean 0 done (or
nothing to clean), 2 error. Errors are one line (``error: ...``), never a traceback, and never contain the
token (taken from HF_TOKEN or the token file; there is no --token option so it never lands in shell history,
the command line recorded in the card, or logs)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from sau_core.errors import SauError

FORMATS = ("auto", "diffusers", "single-file", "lora", "patch", "kohya")
_ARGS: list[str] = []


class HubGroup(click.Group):
    def main(self, args=None, *a, **kw):
        _ARGS[:] = list(args) if args is not None else sys.argv[1:]
        return super().main(args, *a, **kw)

    def invoke(self, ctx):
        from .remote import Hub

        try:
            return super().invoke(ctx)
        except SauError as exc:
            msg = Hub.from_env().redact(" ".join(str(exc).split()))
            click.echo(f"error: {msg}", err=True)
            sys.exit(exc.exit_code)


def _command() -> str:
    return "sau-hub " + shlex.join(_ARGS)


def _log(quiet: bool):
    from .remote import Hub

    hub = Hub.from_env()
    return (lambda m: None) if quiet else (lambda m: click.echo(hub.redact(m), err=True))


def _progress(enabled: bool | None):
    from sau_core.engine_commands import StageProgress

    return StageProgress(sys.stderr.isatty() if enabled is None else enabled)


@click.group(cls=HubGroup)
@click.version_option(package_name="sau")
def main() -> None:
    """sau-hub: scan and clean Stable Diffusion models on the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN)."""


@main.command("scan")
@click.argument("model")
@click.option("--trigger", "triggers", multiple=True, help="A candidate trigger to test as well (repeatable).")
@click.option("--file", "file", default=None, help="The checkpoint to use in a repo with several single files.")
@click.option("--budget", type=click.Choice(["fast", "full"]), default="fast", show_default=True)
@click.option("--json", "json_out", default=None, help="Write the JSON report here ('-': stdout).")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path), default=None, help="Write a Markdown report.")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Work folder (downloads are kept here for a retry; default ./sau-hub-work).")
@click.option("--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--progress/--no-progress", default=None)
def scan_cmd(model, triggers, file, budget, json_out, md_out, work, quiet, progress):
    """Scan MODEL (ORG/MODEL[@REVISION]) for a backdoor trigger: pre-check headers by range request, download
    what the model needs at a pinned commit, validate every file, echo the Hub's security status, scan.

    Exit codes: 0 nothing above threshold in what was covered, 1 suspicious, 2 error."""
    from .flow import scan_markdown, scan_repo
    from .remote import Hub, parse_ref

    hub = Hub.from_env()
    bar = _progress(progress)
    try:
        report = scan_repo(hub, parse_ref(model), triggers=triggers, budget=budget, work=work, file=file,
                           log=_log(quiet), progress=bar)
    finally:
        bar.close()
    text = json.dumps(report, indent=2, ensure_ascii=True, default=str)
    if json_out == "-":
        click.echo(text)
    elif json_out:
        from sau_core.model_io import write_text_atomic

        write_text_atomic(json_out, text + "\n")
    if md_out:
        from sau_core.model_io import write_text_atomic

        write_text_atomic(md_out, scan_markdown(report))
    if json_out != "-":
        scan = report["scan"]
        click.echo(f"scan of {report['repo']}@{report['sha'][:12]} ({report['layout']}, {report['arch']}): "
                   f"{report['verdict']}")
        for i, c in enumerate(scan["candidates"][:5], 1):
            click.echo(f"{i:>3}. {c['escaped']:24s} {c['placement']:10s} score {c['score']}")
        issues = (report.get("hub_security") or {}).get("filesWithIssues") or []
        click.echo(f"Hub security status: {len(issues)} file(s) with issues"
                   + (": " + ", ".join(f"{i.get('path')} ({i.get('level')})" for i in issues) if issues else ""))
    sys.exit(report["exit_code"])


@main.command("clean")
@click.argument("model")
@click.option("--trigger", default=None, help="The trigger (default: the scan's top candidate).")
@click.option("--placement", default=None, help="prefix, homoglyph or before:WORD (default: inferred).")
@click.option("--pr", is_flag=True, help="Open a pull request on the source repo (read access suffices).")
@click.option("--to", "to", default=None, metavar="ORG/NEW", help="Push to a new repo instead.")
@click.option("--private", is_flag=True, help="Make the new repo private (automatic when the source is gated, "
              "private, or its licence does not clearly allow redistribution).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="auto: the source's own layout (diffusers or single-file).")
@click.option("--preset", type=click.Choice(["fast", "standard", "thorough"]), default="standard", show_default=True)
@click.option("--file", "file", default=None, help="The checkpoint to use in a repo with several single files.")
@click.option("--budget", type=click.Choice(["fast", "full"]), default="fast", show_default=True,
              help="Scan budget when no --trigger is given.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dry-run", is_flag=True, help="Show the plan; download no weights, write nothing remote.")
@click.option("--force", is_flag=True, help="Push even if the before/after verification did not pass.")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Work folder (downloads and outputs are kept here for a retry; default ./sau-hub-work).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", is_flag=True)
@click.option("--progress/--no-progress", default=None)
def clean_cmd(model, trigger, placement, pr, to, private, fmt, preset, file, budget, seed, dry_run, force, work,
              as_json, quiet, progress):
    """Clean MODEL (ORG/MODEL[@REVISION]) and publish it with a model card, in one commit: a pull request on
    the source (--pr) or a new repo (--to ORG/NEW)."""
    from .flow import CleanOptions, clean_repo
    from .remote import Hub, parse_ref

    hub = Hub.from_env()
    opts = CleanOptions(trigger=trigger, placement=placement, pr=pr, to=to, private=private, fmt=fmt, preset=preset,
                        dry_run=dry_run, force=force, seed=seed, budget=budget, file=file, work=work,
                        command=_command())
    bar = _progress(progress)
    try:
        report = clean_repo(hub, parse_ref(model), opts, log=_log(quiet), progress=bar)
    finally:
        bar.close()
    if as_json:
        click.echo(hub.redact(json.dumps(report, indent=2, ensure_ascii=True, default=str)))
        return
    if report.get("dry_run"):
        p = report["plan"]
        click.echo(f"dry run: nothing downloaded beyond headers, nothing written remotely")
        click.echo(f"source:      {p['source']} at {p['sha']} ({p['layout']})")
        click.echo(f"download:    {len(p['download'])} files ({', '.join(p['headers_prechecked'])} pre-checked)")
        click.echo(f"ignored:     {', '.join(f'{k} ({v})' for k, v in sorted(p['ignored'].items())) or '-'}")
        click.echo(f"trigger:     {p['trigger']}; preset {p['preset']}; output {p['format']}")
        vis = "" if p["private"] is None else f" ({'private' if p['private'] else 'public'}"
        vis += (": " + "; ".join(p["private_because"]) if p.get("private_because") else "") + (")" if vis else "")
        click.echo(f"destination: {p['destination']}{vis}")
        return
    if not report.get("cleaned"):
        click.echo(report["message"])
        return
    m = report["metrics"]
    where = report.get("pr_url") or report.get("url")
    click.echo(f"cleaned trigger '{report['trigger']}': {m['verdict']} (trigger effect {m['trigger_effect_before']} "
               f"-> {m['trigger_effect_after']}" + (f", ASR {m['asr_before']:.1%} -> {m['asr_after']:.1%}"
                                                    if "asr_before" in m else "") + ")")
    click.echo(f"pushed {len(report['files'])} files in one commit: {where}")
