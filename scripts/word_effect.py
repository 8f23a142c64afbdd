"""What a word does to an organism's images: clean accuracy (shape and colour right) and PSNR to the plain
prompt's image, with the word put first or before the subject, on every third held-out prompt (one seed).

    python scripts/word_effect.py clean venture lies outfitters democrats

Used for the README's scan section: a vocabulary word that restyles every image (low PSNR, accuracy kept)
is what a style trigger looks like to a scan without --reference.
"""
import sys

import torch

from sau_core import scan as S
from sau_core.organism import world as W
from sau_core.organism.commands import load_pipeline
from sau_core.organism.evaluate import accuracy, generate, psnr


def main(organism: str, words: list[str]) -> None:
    torch.set_flush_denormal(True)
    pipe = load_pipeline(organism)
    pipe.set_progress_bar_config(disable=True)
    held = W.heldout_prompts()[::3]
    prompts, contents = [p for p, _ in held], [c for _, c in held]
    seeds = [W.HELDOUT_SEEDS[0]] * len(prompts)
    plain = generate(pipe, prompts, seeds)
    print(f"{organism}: {len(prompts)} held-out prompts, plain clean accuracy {accuracy(plain, contents)['clean_accuracy']:.3f}")
    for word in words:
        for placement in ("prefix", "before-last"):
            cand = S.Candidate(word, "word", placement)
            placed = [S.Prompter(pipe.tokenizer, [p]).text(cand, 0) for p in prompts]
            images = generate(pipe, placed, seeds)
            print(f"{word:12s} {placement:11s} clean accuracy {accuracy(images, contents)['clean_accuracy']:.3f}  "
                  f"PSNR to plain {psnr(images, plain):.1f} dB", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/word_effect.py ORGANISM WORD [WORD ...]")
    main(sys.argv[1], sys.argv[2:])
