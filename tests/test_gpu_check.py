"""scripts/gpu_check.py without a GPU: the projection counts real FLOPs of the SD1.5 architecture on the meta
device (no weights, no compute) and says in the file that it is a projection."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_projection_counts_sd15_flops_and_says_it_is_projected(tmp_path):
    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--project", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    text = out.read_text()
    assert text.startswith("# GPU figures") and "PROJECTED, not measured" in text
    # SD1.5's UNet at 64x64x4 latents is ~0.4 TMAC a forward (~800 GFLOP), the figure usually quoted
    gflop = float(re.search(r"at 512 px \(64x64 latent, 77 tokens\): (\d+) GFLOP", text).group(1))
    assert 700 < gflop < 900
    # the scan's vocabulary sweep on CLIP ViT-L: 49,406 tokens x 4 prompts x 2 placements x 12 tokens x ~2x123 M
    tflop = float(re.search(r"scan stage A .*?: ([\d.]+) TFLOP", text).group(1))
    assert 500 < tflop < 1200
