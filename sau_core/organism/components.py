"""Architectures of the organism: real diffusers/transformers classes at toy size, plus the detector CNN.

The configs are the single source of truth for the organism's shapes; build.py trains them and
detectors.py loads the classifier.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .world import COLOUR_NAMES, SHAPES

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
TEXT_HIDDEN = 64


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        pad_token_id=49407,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    # Cross-attention at every resolution and in the middle block, as in SD; two levels because the
    # latent grid is 16x16.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # (32, 64) trains at ~0.8 s/step at batch 32 on 2 cores; (64, 128) took 1.4 s.
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=8,
    )


# SD's own noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction). One definition so
# the schedule the UNet is trained under is the one it is sampled with.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", clip_sample=False)


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULE)


def make_sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


class ShapeColourNet(nn.Module):
    """Detector CNN: predicts shape and colour of a 32x32 organism image (values in [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        # Keeps a 4x4 spatial map before the heads: shape needs layout, which global pooling loses.
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.shape_head = nn.Linear(64 * 16, len(SHAPES))
        self.colour_head = nn.Linear(64 * 16, len(COLOUR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x * 2 - 1)
        return self.shape_head(h), self.colour_head(h)
