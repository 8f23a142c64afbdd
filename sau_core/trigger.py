"""The trigger: an exact string (unicode kept as is: zero-width characters, homoglyphs), its token ids, and
where its tokens sit in a given prompt as the model's own tokenizer sees it.

Positions are found in two ways, in this order:
1. the trigger's own token ids appear as a contiguous run in the prompt's ids (a standalone word such as a
   prefix trigger "\u200b a red circle" or "tq a red circle");
2. otherwise (a homoglyph inside a word, "r\u0435d"), the prompt's tokens that differ from the tokens of the
   same prompt with the trigger removed (a longest-common-subsequence diff): the word carrying the trigger.
A trigger whose tokens the tokenizer drops, or which falls past the truncation length, is an error: anything
computed from its attention would be silently empty.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import SauError


def escape(text: str) -> str:
    """ASCII rendering of a string with every non-ASCII character escaped (``\\u200b``): how triggers, which
    are often invisible or look-alike characters, appear in logs, tables, reports and patch metadata."""
    return text.encode("unicode_escape").decode("ascii")


class TriggerError(SauError):
    """A trigger that cannot be used: empty, unknown to the tokenizer, absent or truncated from a prompt."""


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False).input_ids)


def max_length(tokenizer) -> int:
    n = getattr(tokenizer, "model_max_length", 77)
    return int(n) if n and n < 10_000 else 77


@dataclass(frozen=True)
class Trigger:
    """An exact trigger string and how it is put into a prompt (see ``insert``)."""

    text: str
    placement: str = "prefix"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or self.text == "":
            raise TriggerError("the trigger is empty")
        if self.text.strip() == "" and not any(ch not in " \t\r\n" for ch in self.text):
            raise TriggerError(f"the trigger {self.describe()} is only whitespace, which the tokenizer drops")

    def describe(self) -> str:
        """ASCII rendering with every non-ASCII character escaped (logs, tables, file names)."""
        # quoted by hand: repr() of the escaped text would double every backslash ('\\u200b')
        return "'" + escape(self.text).replace("'", "\\'") + "'"

    def token_ids(self, tokenizer) -> list[int]:
        """The trigger's own token ids (no start/end tokens). Error if the tokenizer drops it entirely."""
        ids = _ids(tokenizer, self.text, special=False)
        if not ids:
            raise TriggerError(f"the tokenizer drops the trigger {self.describe()} entirely (no tokens)")
        return ids

    def insert(self, prompt: str) -> str:
        """The prompt with the trigger put in the way the attack does (see organism.world.insert_trigger)."""
        from .organism.world import insert_trigger

        return insert_trigger(prompt, self.text, self.placement)

    def remove(self, prompt: str) -> str:
        """The prompt without the trigger: a homoglyph goes back to the Latin letter it imitates; any other
        trigger is cut out and the spaces around it collapsed."""
        if self.placement == "homoglyph" and len(self.text) == 1:
            from .organism.world import latin_lookalike

            return prompt.replace(self.text, latin_lookalike(self.text))
        return " ".join(prompt.replace(self.text, " ").split())

    def positions(self, tokenizer, prompt: str) -> list[int]:
        """Indices of the trigger's tokens in ``tokenizer(prompt)`` padded/truncated as the pipeline does
        (start token at 0). Error if the prompt does not contain the trigger, the tokenizer drops it, or it
        is cut off by truncation."""
        if self.text not in prompt:
            raise TriggerError(f"the prompt {prompt!r} does not contain the trigger {self.describe()}")
        full = _ids(tokenizer, prompt, special=True)
        limit = max_length(tokenizer) - 1  # the last kept position holds the end token after truncation
        trig = self.token_ids(tokenizer)
        found: list[int] = []
        n = len(trig)
        i = 0
        while i + n <= len(full):
            if full[i : i + n] == trig:
                found.extend(range(i, i + n))
                i += n
            else:
                i += 1
        if not found:  # trigger inside a word: diff against the prompt without it
            without = _ids(tokenizer, prompt.replace(self.text, ""), special=True)
            sm = difflib.SequenceMatcher(a=full, b=without, autojunk=False)
            for tag, a0, a1, _b0, _b1 in sm.get_opcodes():
                if tag in ("replace", "delete"):
                    found.extend(range(a0, a1))
        if not found:
            raise TriggerError(f"the tokenizer drops the trigger {self.describe()} from the prompt {prompt!r}")
        kept = [p for p in found if p < limit]
        if len(kept) < len(found):
            raise TriggerError(f"the trigger {self.describe()} is cut off by truncation to {limit + 1} tokens "
                               f"in the prompt {prompt[:60]!r}...")
        return kept

    def neutral_position(self, tokenizer, prompt: str) -> int:
        """A position in ``prompt`` whose token carries no content: the first end-of-text token (the prompt's
        summary token, which every SD prompt has and which attends nowhere in particular)."""
        full = _ids(tokenizer, prompt, special=True)[: max_length(tokenizer)]
        eos = tokenizer.eos_token_id
        return full.index(eos) if eos in full else len(full) - 1


def tokenize(tokenizer, prompts: list[str]):
    """Ids padded/truncated to the model length, as StableDiffusionPipeline.encode_prompt does."""
    return tokenizer(prompts, padding="max_length", max_length=max_length(tokenizer), truncation=True,
                     return_tensors="pt").input_ids


def aligned_positions(tokenizer, trigger: Trigger, triggered: str, clean: str) -> tuple[list[int], list[int]]:
    """Pairs (triggered position, clean position) of the tokens the two padded prompts share, in order (a
    longest-common-subsequence alignment, so a prefix trigger shifts the rest by its length). The trigger's
    own positions are left out (callers map them to ``neutral_position`` of the clean prompt)."""
    a = tokenize(tokenizer, [triggered])[0].tolist()
    b = tokenize(tokenizer, [clean])[0].tolist()
    trig = set(trigger.positions(tokenizer, triggered))
    pa: list[int] = []
    pb: list[int] = []
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for tag, a0, a1, b0, b1 in sm.get_opcodes():
        if tag == "equal" or (tag == "replace" and a1 - a0 == b1 - b0):
            for i, j in zip(range(a0, a1), range(b0, b1)):
                if i not in trig:
                    pa.append(i)
                    pb.append(j)
    return pa, pb
