"""The "SAU" tab, written with what both gradio 3.41.2 (A1111 1.10) and 4.40.0 (Forge) accept: components
with ``value``/``choices``/``label``/``elem_id``/``elem_classes``/``visible``, ``gr.update``, event
listeners with ``fn``/``inputs``/``outputs``/``queue``; no ``.style()``, no ``_js``/``js``.

Long jobs run in a worker thread; the event handler is a generator that streams the host's
``shared.state.textinfo`` into the status line until the job ends (A1111 and Forge enable the queue).
"""
from __future__ import annotations

import html
import threading
import traceback

import gradio as gr

from . import jobs

PRESETS = ["fast", "standard", "thorough"]
POLL_S = 0.5


def _status(text: str, kind: str = "info") -> str:
    return f"<div class='sau-status sau-{kind}' id='sau_status_{kind}'>{html.escape(text)}</div>"


def _run_streaming(host, work, render):
    """Run ``work()`` -> Outcome in a thread; yield ``render(status_html, outcome_or_None)`` while it runs."""
    box: dict = {}

    def target():
        try:
            box["outcome"] = work()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a visible message
            from sau_core.errors import SauError
            from sau_core.interrupt import Cancelled

            if isinstance(exc, Cancelled):
                box["error"] = ("warn", str(exc))
            elif isinstance(exc, (SauError, LookupError)):
                box["error"] = ("error", f"error: {exc}")
            else:
                traceback.print_exc()
                box["error"] = ("error", f"error: {type(exc).__name__}: {exc}")

    th = threading.Thread(target=target, name="sau-job", daemon=True)
    th.start()
    while th.is_alive():
        th.join(POLL_S)
        if th.is_alive():
            yield render(_status(getattr(host.state, "textinfo", None) or "SAU: working...", "busy"), None)
    if "error" in box:
        kind, msg = box["error"]
        yield render(_status(msg, kind), None)
    else:
        out = box["outcome"]
        yield render(_status(out.message, "ok" if out.ok else "warn"), out)


def build(host):
    """The tab's Blocks (the caller hands ``[(blocks, "SAU", "sau")]`` to ``on_ui_tabs``)."""
    titles = host.checkpoint_titles()
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML(f"<div class='sau-head'>SAU finds and removes backdoors (trigger &rarr; hidden behaviour) in "
                f"Stable Diffusion checkpoints. Host: {html.escape(host.name)}.</div>")
        with gr.Row():
            ckpt = gr.Dropdown(choices=titles, value=titles[0] if titles else None, label="Checkpoint",
                               elem_id="sau_checkpoint", interactive=True, scale=4)
            refresh = gr.Button("\u21bb Refresh list", elem_id="sau_refresh", elem_classes=["sau-tool"], scale=1)
        with gr.Row():
            trigger = gr.Textbox(label="Trigger (empty: scan first, then clean the top candidate if suspicious; "
                                 "escapes such as \\u200b work)", elem_id="sau_trigger", lines=1)
            preset = gr.Radio(choices=PRESETS, value=host.option("sau_default_preset"), label="Preset",
                              elem_id="sau_preset")
        with gr.Row():
            out_name = gr.Textbox(label="Output name (empty: <name>-sau.safetensors next to the input)",
                                  elem_id="sau_out_name", lines=1)
            save_lora = gr.Checkbox(label="Also save the LoRA to models/Lora", value=False, elem_id="sau_save_lora")
        with gr.Row():
            scan_btn = gr.Button("Scan", elem_id="sau_scan")
            clean_btn = gr.Button("Sanitize", variant="primary", elem_id="sau_sanitize")
            stop_btn = gr.Button("Interrupt", elem_id="sau_interrupt")
        status = gr.HTML(_status("Choose a checkpoint, then Scan or Sanitize."), elem_id="sau_status")
        with gr.Row():
            grid_trig = gr.Image(label="Triggered prompts (top: before, bottom: after)", type="pil",
                                 interactive=False, elem_id="sau_grid_triggered")
            grid_clean = gr.Image(label="Clean prompts (top: before, bottom: after)", type="pil",
                                  interactive=False, elem_id="sau_grid_clean")
        metrics = gr.HTML("", elem_id="sau_metrics")
        new_title = gr.State(None)
        load_btn = gr.Button("Load it", visible=False, elem_id="sau_load")

        def do_refresh(current):
            names = host.refresh_checkpoints()
            return (gr.update(choices=names, value=current if current in names else (names[0] if names else None)),
                    _status(f"Checkpoint list refreshed: {len(names)} checkpoints.", "ok"))

        refresh.click(fn=do_refresh, inputs=[ckpt], outputs=[ckpt, status], queue=False)

        def do_scan(title):
            if not title:
                yield _status("error: choose a checkpoint first", "error"), gr.update()
                return

            def render(st, out):
                return st, (gr.update(value=out.metrics_html) if out is not None else gr.update())

            yield from _run_streaming(host, lambda: jobs.scan_job(host, title, log=print), render)

        scan_btn.click(fn=do_scan, inputs=[ckpt], outputs=[status, metrics])

        def do_sanitize(title, trig, pre, name, lora):
            if not title:
                yield _status("error: choose a checkpoint first", "error"), *([gr.update()] * 6)
                return
            out_dir = host.option("sau_output_dir")

            def render(st, out):
                if out is None:
                    return st, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
                if out.out_path is None:  # no clean (nothing suspicious): show what the scan found
                    return st, gr.update(), gr.update(), gr.update(value=out.metrics_html), gr.update(), \
                        gr.update(), gr.update(visible=False)
                names = host.refresh_checkpoints()
                made = host.title_of(out.out_path)
                return (st, gr.update(value=out.grids["triggered"]), gr.update(value=out.grids["clean"]),
                        gr.update(value=out.metrics_html), gr.update(choices=names, value=made or title), made,
                        gr.update(visible=made is not None, value=f"Load it ({out.out_path.name})"))

            yield from _run_streaming(
                host, lambda: jobs.sanitize_job(host, title, trig, pre, name, bool(lora), out_dir, log=print), render)

        clean_btn.click(fn=do_sanitize, inputs=[ckpt, trigger, preset, out_name, save_lora],
                        outputs=[status, grid_trig, grid_clean, metrics, ckpt, new_title, load_btn])

        def do_interrupt():
            host.interrupt()
            return _status("Interrupt requested: the job stops at its next step and writes nothing.", "warn")

        stop_btn.click(fn=do_interrupt, inputs=[], outputs=[status], queue=False)

        def do_load(made):
            if not made:
                return _status("error: nothing to load yet", "error")
            try:
                loaded = host.load_checkpoint(made)
            except Exception as exc:  # noqa: BLE001
                return _status(f"error: loading {made} failed: {exc}", "error")
            return _status(f"Loaded {loaded} as the {host.name} checkpoint.", "ok")

        load_btn.click(fn=do_load, inputs=[new_title], outputs=[status])
    return tab

