"""The tab's two jobs on a checkpoint file, as engine calls (``sau_core`` does the work; this module only
chooses paths, wires the host's progress/interruption in and turns results into what the tab shows).

* Scan: ``sau_core.scan.scan(handle, budget="fast")``.
* Sanitize: the trigger (typed, or the scan's top candidate when the box is empty and the scan finds the model
  suspicious), before/after preview grids (``sau_core.demo.preview``), ``sau_core.sanitize.sanitize``, then
  ``sau_core.patch.export`` as a single file (and optionally a kohya LoRA), both atomic.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sau_core.errors import SauError
from sau_core.interrupt import Cancelled, check_before_forward


@dataclass
class Outcome:
    """What a job leaves for the tab: a message, and for a clean the grids, metrics and new file."""

    ok: bool
    message: str
    metrics_html: str = ""
    grids: dict[str, Any] = field(default_factory=dict)  # "triggered" / "clean" -> PIL image
    out_path: Path | None = None
    lora_path: Path | None = None


def parse_trigger(text: str | None) -> str | None:
    """The trigger box: escapes such as ``\\u200b`` are decoded (invisible characters are hard to type);
    empty means "scan first"."""
    from sau_core.scan import decode_escapes

    if text is None or text == "":
        return None
    return decode_escapes(text)


def output_path(src: Path, name: str = "", out_dir: str = "") -> Path:
    """``<name>-sau.safetensors`` next to the input (or in ``out_dir``); never an existing file: the default
    name counts up (``-sau-2``), a name the user typed is refused if taken."""
    folder = Path(out_dir).expanduser() if out_dir and out_dir.strip() else src.parent
    name = (name or "").strip()
    if name:
        if Path(name).name != name or name in (".", ".."):
            raise SauError(f"output name {name!r} must be a file name, not a path")
        stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
        out = folder / f"{stem}.safetensors"
        if out.exists() or out.is_symlink():
            raise SauError(f"{out} exists; SAU never overwrites a checkpoint (choose another output name)")
        return out
    stem = src.name.split(".")[0] + "-sau"
    out, i = folder / f"{stem}.safetensors", 2
    while out.exists() or out.is_symlink():
        out, i = folder / f"{stem}-{i}.safetensors", i + 1
    return out


class Reporter:
    """The engine's ``progress(stage, done, total)`` on the host's ``shared.state``; raises
    :class:`Cancelled` once the host's Interrupt was pressed."""

    def __init__(self, host, log: Callable[[str], None] | None = None):
        self.host = host
        self.log = log or (lambda _m: None)
        self.stage = "starting"

    def check(self) -> None:
        if self.host.interrupted():
            raise Cancelled("interrupted: the clean stopped and nothing was written")

    def __call__(self, stage: str, done: int, total: int) -> None:
        st = self.host.state
        if stage != self.stage:
            self.stage = stage
            st.job_no = getattr(st, "job_no", 0) + 1
        st.sampling_step, st.sampling_steps = int(done), int(total)
        st.textinfo = f"SAU: {stage} {done}/{total}"
        self.log(st.textinfo)
        self.check()


def _load(host, title: str, rep: Reporter):
    from sau_core.model_io import load_model

    path = host.checkpoint_path(title)
    rep("loading", 0, 1)
    handle = load_model(path)  # validates the file; pickles are refused here, never unpickled
    rep("loading", 1, 1)
    return path, handle


def run_scan(host, title: str, rep: Reporter):
    """(path, handle, ScanResult) of a fast scan of the checkpoint ``title``."""
    from sau_core.scan import scan

    path, handle = _load(host, title, rep)
    remove = check_before_forward(handle, rep.check)
    try:
        result = scan(handle, budget="fast", progress=rep)
    finally:
        remove()
    result.model = path.name
    return path, handle, result


def scan_html(result) -> str:
    rows = "".join(
        f"<tr><td>{i}</td><td><code>{html.escape(c['escaped'])}</code></td><td>{html.escape(c['placement'])}</td>"
        f"<td>{c['score'] if c['score'] is not None else '-'}</td><td>{html.escape(c['source'])}</td></tr>"
        for i, c in enumerate(result.candidates[:8], 1))
    cov = result.coverage
    return (f"<p class='sau-verdict'>Scan verdict: <b>{html.escape(result.verdict)}</b> (threshold z &ge; "
            f"{result.threshold}; {result.seconds.get('total', 0):.1f} s). A scan never declares a model clean.</p>"
            "<table class='sau-table'><tr><th>rank</th><th>candidate</th><th>placement</th><th>score (z)</th>"
            f"<th>source</th></tr>{rows}</table><p class='sau-note'>Not covered: "
            f"{html.escape(str(cov.get('not_covered', '-')))}</p>")


def scan_job(host, title: str, log=None) -> Outcome:
    rep = Reporter(host, log)
    with host.job("SAU scan"):
        _, _, result = run_scan(host, title, rep)
    top = result.candidates[0] if result.candidates else None
    msg = (f"Suspicious: the top candidate is {top['escaped']} ({top['placement']}); Sanitize with an empty "
           "trigger box cleans it." if result.suspicious and top else
           "Nothing stood out in this scan (which does not mean the model is clean).")
    return Outcome(True, msg, scan_html(result))


def sanitize_job(host, title: str, trigger_text: str | None, preset: str, name: str = "", save_lora: bool = False,
                 out_dir: str = "", log=None) -> Outcome:
    from sau_core.demo import grid_image, preview, preview_metrics, preview_prompts
    from sau_core.engine_commands import resolve_trigger
    from sau_core.patch import export
    from sau_core.sanitize import preset as check_preset
    from sau_core.sanitize import sanitize
    from sau_core.trigger import Trigger

    check_preset(preset)
    rep = Reporter(host, log)
    text = parse_trigger(trigger_text)
    with host.job("SAU sanitize", job_count=4):
        scanned = None
        if text is None:
            path, handle, scanned = run_scan(host, title, rep)
            if not scanned.suspicious or not scanned.candidates:
                return Outcome(False, "No trigger given and the scan found nothing suspicious, so nothing was "
                               "cleaned. Type the trigger if you know it (escapes such as \\u200b work).",
                               scan_html(scanned))
            top = scanned.candidates[0]
            trigger = Trigger(top["text"], top["placement"])
        else:
            path, handle = _load(host, title, rep)
            trigger, _ = resolve_trigger(path, text, None)
        trigger.token_ids(handle.tokenizer)  # a trigger the tokenizer drops is refused before any work
        out = output_path(path, name, out_dir)
        lora = (host.lora_dir() / f"{out.name[: -len('.safetensors')]}-lora.safetensors") if save_lora else None
        if lora is not None and (lora.exists() or lora.is_symlink()):
            raise SauError(f"{lora} exists; SAU never overwrites a LoRA (choose another output name)")
        remove = check_before_forward(handle, rep.check)
        try:
            pipe = handle.to_pipeline()
            pipe.set_progress_bar_config(disable=True)
            prompts = preview_prompts(handle, trigger)
            rep("preview before", 0, 1)
            before = preview(pipe, trigger, prompts)
            t0 = time.time()
            result = sanitize(handle, trigger, preset, seed=0, progress=rep)
            clean_s = time.time() - t0
            rep("preview after", 0, 1)
            after = preview(pipe, trigger, prompts)
            metrics = preview_metrics(before, after)
            rep("saving", 0, 1)
            export(handle, "single-file", out, result.metadata({"preview": metrics}))
        finally:
            remove()
        lora_note = ""
        if lora is not None:
            try:
                export(handle, "kohya", lora, result.metadata({"preview": metrics}))
            except SauError as exc:  # the checkpoint is written; say why the LoRA is not
                lora, lora_note = None, f" LoRA not saved: {exc}"
    grids = {"triggered": grid_image(*(before[0], after[0])), "clean": grid_image(before[1], after[1])}
    how = f" (scan's top candidate, score {scanned.candidates[0]['score']})" if scanned is not None else ""
    msg = (f"Sanitized {path.name} of trigger {trigger.describe()}{how} with preset {preset} in {clean_s:.1f} s "
           f"-> {out.name}" + (f" and {lora.name} in {lora.parent}" if lora else "") + "." + lora_note)
    return Outcome(True, msg, metrics_html(metrics, result, out, lora), grids, out, lora)


def metrics_html(m: dict, result, out: Path, lora: Path | None) -> str:
    shift = result.text_shift
    te = f"{shift.get('ratio')}" + (f" &rarr; {shift['ratio_after']}" if "ratio_after" in shift else "")
    rows = [
        ("Trigger's effect on the images (mean |triggered &minus; clean|, same noise)",
         f"{m['trigger_effect_before']:.4f}", f"{m['trigger_effect_after']:.4f}"),
        ("Clean-prompt images, PSNR after vs before (dB)", "", f"{m['clean_psnr_db']}"),
        (f"Text-encoder shift ratio (threshold {shift.get('threshold')})", te, ""),
        ("Stages / seconds", html.escape(", ".join(result.stages)), f"{result.seconds.get('total', 0):.1f} s"),
        ("UNet forward+backward passes", "", f"{result.unet_passes}"),
        ("Written", html.escape(str(out)), html.escape(str(lora)) if lora else ""),
    ]
    body = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    return ("<table class='sau-table' id='sau_metrics_table'><tr><th>metric</th><th>before</th><th>after</th></tr>"
            f"{body}</table><p class='sau-note'>Grids: top row before, bottom row after; {m['images']} prompts, "
            "each pair from the same noise.</p>")
