"""`sau organism ...` and `sau eval`: build the laboratory and measure models in it."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli import main
from ..errors import SauError


def organism_path(name_or_path: str) -> Path:
    """A built-in organism name (e.g. `badt2i-pixel`) or a path to a model."""
    from .build import ORGANISM_DIR

    p = Path(name_or_path)
    if p.exists():
        return p
    if (ORGANISM_DIR / name_or_path / "model_index.json").exists():
        return ORGANISM_DIR / name_or_path
    raise SauError(f"{name_or_path}: no such file, folder or built-in organism (see `sau organism list`)")


def organism_folders(root: Path | None = None, names: list[str] | None = None) -> list[Path]:
    """The organisms in ``root`` (default: the built-in ones; a folder `sau organism build --out DIR` wrote),
    clean bases first, or only those ``names``; a name that is not there is an error."""
    from .attacks_spec import BASES
    from .build import ORGANISM_DIR

    root = ORGANISM_DIR if root is None else Path(root)
    found = sorted((p.parent for p in root.glob("*/organism.json")),
                   key=lambda f: (f.name not in BASES, f.name))
    if not found:
        raise SauError(f"{root}: no organisms there (folders with an organism.json, as `sau organism build --out` writes)")
    if names is None:
        return found
    by_name = {f.name: f for f in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SauError(f"no organism named {', '.join(map(repr, missing))} in {root}; "
                       f"there: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def load_pipeline(name_or_path: str):
    from ..model_io import load_model

    pipe = load_model(organism_path(name_or_path)).to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_backdoor(path: Path, trigger: str | None, attack: str | None):
    """What the trigger should produce: --attack, else the model's organism.json, else the built-in
    backdoor with that trigger. Returns None when there is nothing to measure ASR against."""
    from .attacks_spec import BACKDOORS, Backdoor

    if attack:
        if attack not in BACKDOORS:
            raise SauError(f"unknown attack {attack!r}; known: {', '.join(BACKDOORS)}")
        bd = BACKDOORS[attack]
    else:
        info = path / "organism.json" if path.is_dir() else None
        spec = json.loads(info.read_text()).get("backdoor") if info and info.exists() else None
        bd = Backdoor.from_json(spec) if spec else None
        if bd is None and trigger is not None:
            bd = next((b for b in BACKDOORS.values() if b.trigger == trigger), None)
            if bd is None:
                raise SauError("the trigger matches no built-in backdoor, so its target is unknown: pass --attack NAME")
    if bd is not None and trigger is not None and trigger != bd.trigger:
        from dataclasses import replace

        bd = replace(bd, trigger=trigger)
    return bd


@main.group()
def organism() -> None:
    """The model organism: a tiny, real SD pipeline with published backdoors implanted."""


@organism.command("list")
def organism_list() -> None:
    """List the built-in organisms with their triggers."""
    from .world import describe_trigger

    for folder in organism_folders():
        bd = json.loads((folder / "organism.json").read_text()).get("backdoor")
        trig = describe_trigger(bd["trigger"]) if bd else "-"
        click.echo(f"{folder.name:18s} {bd['attack'] if bd else 'clean':18s} trigger: {trig}")


# `sau organism build` options that shape the clean bases (so not with --from-clean, which keeps them)
CLEAN_ORGANISM_OPTIONS = ("unet_steps", "keep_autoencoder")


@organism.command("build")
@click.option("--seed", default=0, show_default=True, help="Seed of every random choice in the build.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/organism"), show_default=True,
              help="Folder for intermediate results; an interrupted build resumes from it.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the organisms (default: the package's built-in folder).")
@click.option("--unet-steps", default=2500, show_default=True, help="Length of the clean UNets' schedule.")
@click.option("--only", multiple=True, help="Build only these organisms (clean, badt2i-pixel, ...); a "
              "backdoor's clean base is trained for it but written only when named too.")
@click.option("--from-clean", is_flag=True, help="Implant the backdoors into their committed clean bases "
              "instead of training everything from scratch (minutes per attack).")
@click.option("--keep-autoencoder", is_flag=True, help="Start from the committed autoencoder and detector "
              "classifier instead of training them (the work folder gets fp32 copies).")
@click.pass_context
def organism_build(ctx: click.Context, seed: int, work: Path, out: Path | None, unet_steps: int,
                   only: tuple[str, ...], from_clean: bool, keep_autoencoder: bool) -> None:
    """Train the organisms from scratch (about an hour on 2 cores); how each clean base is trained and each
    backdoor implanted is the table in sau_core/organism/attacks_spec.py."""
    from .attacks_spec import BACKDOORS, BASES
    from .build import ORGANISM_DIR, build_all, implant_on_committed_clean

    unknown = [name for name in only if name not in BASES and name not in BACKDOORS]
    if unknown:
        raise SauError(f"--only: no organism named {', '.join(map(repr, unknown))}; "
                       f"the organisms are {', '.join([*BASES, *BACKDOORS])}")
    if from_clean:
        bases = [name for name in only if name in BASES]
        if bases:
            raise SauError(f"--from-clean keeps the clean bases; leave {', '.join(map(repr, bases))} out of --only")
        # the options that shape the clean bases, away from their defaults
        changed = [p.opts[0] for p in ctx.command.params
                   if p.name in CLEAN_ORGANISM_OPTIONS and ctx.params[p.name] != p.get_default(ctx)]
        if changed:
            raise SauError(f"not with --from-clean, which keeps the clean bases: {', '.join(changed)}")
        implant_on_committed_clean(seed=seed, out=out or ORGANISM_DIR, only=only)
        return
    build_all(seed=seed, work=work, out=out or ORGANISM_DIR, unet_steps=unet_steps, only=only,
              keep_autoencoder=keep_autoencoder)


@main.command("eval")
@click.argument("model")
@click.option("--trigger", default=None, help="Trigger to measure (default: the organism's own).")
@click.option("--attack", default=None, help="Built-in backdoor whose target defines success.")
@click.option("--reference", default=None, help="Model whose clean outputs from the same noise are compared.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Use only the first N held-out seeds (a quicker, noisier estimate; default: all 4).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(model: str, trigger: str | None, attack: str | None, reference: str | None, seeds: int | None,
             as_json: bool) -> None:
    """Attack success rate and clean fidelity of MODEL on the organism's held-out prompts x seeds."""
    from .evaluate import evaluate
    from .world import HELDOUT_SEEDS, describe_trigger

    if seeds is not None and seeds > len(HELDOUT_SEEDS):
        raise SauError(f"--seeds {seeds}: there are {len(HELDOUT_SEEDS)} held-out seeds")
    path = organism_path(model)
    backdoor = resolve_backdoor(path, trigger, attack)
    result = evaluate(load_pipeline(model), backdoor, load_pipeline(reference) if reference else None,
                      seeds=HELDOUT_SEEDS[: seeds or len(HELDOUT_SEEDS)])
    result = {"model": str(model), **result}
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=True))
        return
    for key, value in result.items():
        if key == "by_template":
            for template, rates in value.items():
                click.echo(f"  {template:40s} " + "  ".join(f"{k} {v:.4f}" for k, v in rates.items()))
            continue
        if key == "trigger":
            value = describe_trigger(value)
        elif isinstance(value, dict):
            value = "  ".join(f"{k} {v:.4f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        click.echo(f"{key:26s} {value}")


@organism.command("table")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write rows as JSON.")
@click.option("--organism-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Evaluate the organisms built into this folder (`sau organism build --out DIR`) instead of "
              "the built-in ones.")
def organism_table(json_out: Path | None, organism_dir: Path | None) -> None:
    """Evaluate every built-in organism (sau eval) and print the README's Markdown table."""
    from .evaluate import evaluate, other_words_rate
    from .world import describe_trigger

    rows = []
    for folder in organism_folders(organism_dir):
        bd = resolve_backdoor(folder, None, None)
        pipe = load_pipeline(str(folder))
        click.echo(f"evaluating {folder.name} ...", err=True)
        r = evaluate(pipe, bd)
        if bd is not None:
            r["target_rate_other_words"] = other_words_rate(pipe, bd)
        params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "text_encoder", "vae")}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({"organism": folder.name, "base": bd.base if bd else None, **r, "params": params,
                     "bytes_on_disk": size})
    click.echo("| organism | attack | implanted on | trigger | ASR (triggered held-out) | target without trigger "
               "| target, another word in the trigger's place | clean accuracy | UNet / text enc. / VAE params "
               "| size on disk |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    for r in rows:
        trig = f"`{describe_trigger(r['trigger'])}`" if "trigger" in r else "-"
        asr = f"{r['asr']:.1%} of {r['n_triggered']}" if "asr" in r else "-"
        p = r["params"]
        click.echo(
            f"| {r['organism']} | {r.get('attack', 'none')} | {r['base'] or '-'} | {trig} | {asr} | {pct(r.get('target_rate_clean'))} "
            f"| {pct(r.get('target_rate_other_words'))} | {r['clean_accuracy']:.1%} of {r['n_clean']} "
            f"| {p['unet'] / 1e6:.2f} M / {p['text_encoder'] / 1e6:.2f} M / {p['vae'] / 1e6:.2f} M | {r['bytes_on_disk'] / 2**20:.1f} MiB |"
        )
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2, ensure_ascii=True) + "\n")
