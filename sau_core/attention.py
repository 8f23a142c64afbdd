"""Cross-attention instrumentation: record the trigger tokens' attention maps, and optionally replace the
keys/values of chosen token positions (the token-neutralisation guard).

``TriggerAttention`` is installed on every cross-attention (attn2) module of a UNet for the duration of a
``with`` block; self-attention processors are left as they were. It computes attention explicitly
(softmax(QK^T * scale) V, the same arithmetic as diffusers' ``AttnProcessor``) so that the maps are part of
the autograd graph when training (``keep_graph=True``), and matches the default processor's output to float
rounding when it edits nothing.

What to record is given as a selector ``select``: a (B, K, L) weight tensor over the L text positions, one
row per recorded map (one-hot rows: one token each; a row of several ones: their summed attention). Each
call of each layer appends a (B, K, h, w) map: the attention probability mass that every spatial query
gives to the selected positions, averaged over heads, on that layer's spatial grid. B must be the batch the
UNet is called with (with classifier-free guidance, the doubled batch).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .errors import UnsupportedModelError


@dataclass
class KVEdit:
    """Replace the key/value at positions ``replace`` (B, L) bool with those computed from
    ``source_states`` (B, L, D) (None: the same encoder states) at positions ``source_index`` (B, L) long."""

    replace: torch.Tensor
    source_index: torch.Tensor
    source_states: torch.Tensor | None = None


@dataclass
class AttnRecord:
    layer: str
    tag: object  # whatever the caller set as controller.tag (e.g. the sampling step index)
    maps: torch.Tensor  # (B, K, h, w)


@dataclass
class AttentionController:
    """Shared state of every installed processor."""

    select: torch.Tensor | None = None
    kv_edit: KVEdit | None = None
    keep_graph: bool = False
    tag: object = None
    records: list[AttnRecord] = field(default_factory=list)
    #: latent (h, w) of the current UNet call, set by a forward pre-hook on the UNet.
    grid: tuple[int, int] | None = None

    def clear(self) -> None:
        self.records = []

    def by_layer(self) -> dict[str, list[AttnRecord]]:
        out: dict[str, list[AttnRecord]] = {}
        for r in self.records:
            out.setdefault(r.layer, []).append(r)
        return out


def cross_attention_names(unet) -> list[str]:
    """Processor keys (``...attn2.processor``) of the UNet's cross-attention modules, in module order."""
    names = []
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False):
            names.append(f"{name}.processor")
    if not names:
        raise UnsupportedModelError("the model has no cross-attention layers (nothing conditions on the prompt)")
    return names


def layer_name(processor_key: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor`` -> the module path."""
    return processor_key[: -len(".processor")] if processor_key.endswith(".processor") else processor_key


def _spatial(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) of a layer with n spatial queries, given the latent grid (downsampling rounds up)."""
    if grid is not None:
        h, w = grid
        for _ in range(8):
            if h * w == n:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise ValueError(f"cannot infer the spatial grid of {n} queries")
    return s, s


class TriggerAttention:
    """Explicit-softmax cross-attention processor; records selected tokens' maps and applies a KV edit."""

    def __init__(self, name: str, controller: AttentionController):
        self.name = name
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        ctl = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        edit = ctl.kv_edit
        if edit is not None:
            src = edit.source_states
            if src is None:
                src_k, src_v = key, value
            else:
                if attn.norm_cross:
                    src = attn.norm_encoder_hidden_states(src)
                src_k, src_v = attn.to_k(src), attn.to_v(src)
            idx = edit.source_index.to(key.device).unsqueeze(-1).expand(-1, -1, key.shape[-1])
            rep = edit.replace.to(key.device).unsqueeze(-1)
            key = torch.where(rep, src_k.gather(1, idx), key)
            value = torch.where(rep, src_v.gather(1, idx), value)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, N, L)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        if ctl.select is not None:
            p = probs.view(batch_size, attn.heads, probs.shape[1], probs.shape[2]).mean(1)  # (B, N, L)
            if not ctl.keep_graph:
                p = p.detach()
            sel = ctl.select.to(p.device, p.dtype)
            m = torch.einsum("bnl,bkl->bkn", p, sel)
            h, w = _spatial(p.shape[1], ctl.grid)
            ctl.records.append(AttnRecord(self.name, ctl.tag, m.reshape(batch_size, sel.shape[1], h, w)))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def instrument(unet, controller: AttentionController | None = None):
    """Install ``TriggerAttention`` on every cross-attention module for the block; restore on exit.

    Yields the controller (a new one if none given). Self-attention processors are kept as they are.
    """
    ctl = controller or AttentionController()
    names = cross_attention_names(unet)
    before = dict(unet.attn_processors)
    procs = dict(before)
    for key in names:
        procs[key] = TriggerAttention(layer_name(key), ctl)

    def _grid(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        ctl.grid = tuple(sample.shape[-2:])

    hook = unet.register_forward_pre_hook(_grid, with_kwargs=True)
    unet.set_attn_processor(procs)
    try:
        yield ctl
    finally:
        hook.remove()
        unet.set_attn_processor(before)


def one_hot_select(positions: list[list[int]], length: int, combine: bool = False) -> torch.Tensor:
    """Selector from per-row position lists. ``combine``: one map per row (their summed mass, K=1);
    otherwise one map per position (K = the longest list; shorter rows are padded with zero rows)."""
    B = len(positions)
    if combine:
        sel = torch.zeros(B, 1, length)
        for b, ps in enumerate(positions):
            sel[b, 0, ps] = 1.0
        return sel
    K = max((len(ps) for ps in positions), default=0)
    sel = torch.zeros(B, max(K, 1), length)
    for b, ps in enumerate(positions):
        for k, p in enumerate(ps):
            sel[b, k, p] = 1.0
    return sel


def neutralise_edit(positions: list[list[int]], neutral: list[int], length: int,
                    source_states: torch.Tensor | None = None) -> KVEdit:
    """KV edit replacing each row's ``positions`` by the key/value of its ``neutral`` position."""
    B = len(positions)
    replace = torch.zeros(B, length, dtype=torch.bool)
    index = torch.arange(length).repeat(B, 1)
    for b, ps in enumerate(positions):
        replace[b, ps] = True
        index[b, ps] = neutral[b]
    return KVEdit(replace, index, source_states)
