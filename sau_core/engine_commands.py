"""`sau clean`, `sau demo` and `sau bench`: the engine's command line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .cli import main
from .errors import SauError

FORMATS = ("auto", "patch", "lora", "kohya", "diffusers", "single-file")


class StageProgress:
    """One tqdm bar per stage on stderr (silent when stderr is not a terminal unless forced)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{stage:12s}", file=sys.stderr, leave=True, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resolve_trigger(model_path: Path, text: str | None, placement: str | None):
    """The trigger to clean: ``--trigger`` (required unless the model is an organism that names its own) and
    how it enters a prompt: ``--placement``, else the organism's, else a homoglyph for a single look-alike
    letter, else a prefix."""
    from .organism.commands import resolve_backdoor
    from .organism.world import latin_lookalike
    from .trigger import Trigger

    bd = None
    try:
        bd = resolve_backdoor(model_path, text, None)
    except SauError:
        bd = None
    if text is None:
        if bd is None:
            raise SauError("no trigger given: pass --trigger TEXT (the string that fires the backdoor)")
        text = bd.trigger
    if placement is None:
        if bd is not None and bd.trigger == text:
            placement = bd.placement
        elif len(text) == 1 and not text.isascii() and latin_lookalike(text).isascii():
            placement = "homoglyph"
        else:
            placement = "prefix"
    return Trigger(text, placement), bd


def default_out(model: str, model_path: Path, fmt: str) -> Path:
    stem = model_path.name.split(".")[0] if model_path.is_file() else Path(model).name
    names = {"patch": f"{stem}-sau-patch.safetensors", "lora": f"{stem}-sau-lora", "kohya": f"{stem}-sau-lora.safetensors",
             "diffusers": f"{stem}-sau", "single-file": f"{stem}-sau.safetensors"}
    return Path.cwd() / names[fmt]


@main.command("clean")
@click.argument("model")
@click.option("--trigger", default=None, help="The trigger string (unicode as is; $'\\u200b' in bash).")
@click.option("--placement", default=None, help="How the trigger enters a prompt: prefix (default), homoglyph, "
              "before:WORD.")
@click.option("--preset", type=click.Choice(["fast", "standard", "thorough"]), default="standard", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="auto: the input's own format (single file -> single-file, folder -> diffusers).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output path (default: ./<name>-sau...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: when a terminal).")
def clean_cmd(model, trigger, placement, preset, fmt, out, overwrite, seed, as_json, progress) -> None:
    """Unlearn TRIGGER from MODEL (a .safetensors checkpoint, a diffusers folder or a built-in organism) and
    write the cleaned model. The input is never modified; the output appears only when complete."""
    from .model_io import load_model
    from .organism.commands import organism_path
    from .patch import export
    from .sanitize import sanitize

    path = organism_path(model)
    trig, _ = resolve_trigger(path, trigger, placement)
    handle = load_model(path)
    if fmt == "auto":
        fmt = "single-file" if handle.source_format == "single-file" else "diffusers"
    out = out or default_out(model, path, fmt)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise SauError(f"{out} exists (pass --overwrite to replace it)")
    bar = StageProgress(sys.stderr.isatty() if progress is None else progress)
    try:
        result = sanitize(handle, trig, preset, seed=seed, progress=bar)
    finally:
        bar.close()
    export(handle, fmt, out, result.metadata(), overwrite=overwrite)
    summary = {"model": str(model), "trigger": trig.text, "placement": trig.placement, "preset": preset,
               "format": fmt, "out": str(out), "stages": result.stages, "seconds": result.seconds,
               "text_shift": result.text_shift, "unet_fwd_bwd_passes": result.unet_passes,
               "layer_scores": result.localisation.summary()["layer_scores"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=True))
    else:
        click.echo(f"cleaned {model} of trigger {trig.describe()} ({preset}, {result.seconds['total']:.1f} s; "
                   f"stages: {', '.join(result.stages)}) -> {out} [{fmt}]")


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("sau-demo"), show_default=True,
              help="Report folder (replaced if it exists).")
@click.option("--organism", "name", default="badt2i-pixel", show_default=True, help="Which built-in organism.")
@click.option("--preset", type=click.Choice(["fast", "standard", "thorough"]), default="standard", show_default=True)
def demo_cmd(out: Path, name: str, preset: str) -> None:
    """The main job on a built-in backdoored organism: localise, clean, verify, write a report folder."""
    from .demo import run_demo

    t0 = time.time()
    report = run_demo(out, name, preset, log=lambda m: click.echo(m, err=True))
    click.echo(f"report: {out / 'report.md'}  ({time.time() - t0:.0f} s)")
    click.echo(f"ASR {report['before']['asr']:.1%} -> {report['after']['asr']:.1%}; clean accuracy "
               f"{report['before']['clean_accuracy']:.1%} -> {report['after']['clean_accuracy']:.1%}")


@main.command("bench")
@click.option("--quick", is_flag=True, help="One held-out seed and half the SKD steps (a few minutes per attack).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench"), show_default=True)
@click.option("--attack", "attacks", multiple=True, help="Only these organisms (repeatable).")
@click.option("--defense", "defenses", multiple=True, help="Only these defences (repeatable).")
def bench_cmd(quick: bool, out: Path, attacks, defenses) -> None:
    """Every organism attack x every defence -> OUT/results.json and OUT/RESULTS.md."""
    from .bench import DEFENSES, run_bench

    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise SauError(f"unknown defence {unknown[0]!r} (choose from {', '.join(DEFENSES)})")
    run_bench(out, quick, list(attacks) or None, list(defenses) or None, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'}")
