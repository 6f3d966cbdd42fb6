"""A multi-style task where GRPO's diversity collapse (and DPH-RL's cure) can be watched on a 2-core CPU.

A prompt is five letters from a..h; a response is a style word, then that style's transform of the letters:

    prompt "c a f b h ="     copy  -> "copy c a f b h"     rev   -> "rev h b f a c"
                             rot   -> "rot a f b h c"      shift -> "shift d b g c a"   (each letter + 1, h -> a)

The reward is 1 only when the transform is exact AND the style is valid for the prompt. Two features of the prompt,
both easy for a model to read, decide which styles are valid:

    the FIRST letter is a, b or c   -> every style is valid (40% of prompts: they become D_pef under the 8/8 rule)
    otherwise the LAST letter (the one just before "=") names the one valid style:
        train / test   a b -> copy (30%)    c d -> rev (15%)    e f -> rot (10%)    g h -> shift (5%)
        ood            the first letters are re-mapped and the shares change (never trained on):
                       a b -> shift (30%)   c d -> rot (20%)    e f -> rev (20%)    g h -> copy (10%);  every style 20%

The last letter of an every-style prompt follows the same shares as on the other prompts, so D_pef and D_exp
prompts share their last letters: what the divergence term keeps on D_pef is the very choice GRPO makes on D_exp.
(The style-naming letter sits next to "=" on purpose: with the roles of the first and last letters swapped, no method
learned the cue within 150 RL steps on the 2-layer model — every policy's style choice stayed prompt-independent.)

A model that samples every style about equally (what `dph_train.sft.sft_styles` trains) solves a single-style prompt
with probability ~1/4 per sample, so its Pass@16 is near 1 while its Pass@1 is near 0.55. "copy" is valid on 70% of
training prompts, so a policy that collapses onto it gains Pass@1 and loses every prompt that needs another style.
"""
from __future__ import annotations

import random
from . import Example, Score, check_split

LETTERS = "abcdefgh"
STYLES = ("copy", "rev", "rot", "shift")
REASONS = ("ok", "wrong_style", "bad_transform", "no_style")
PROMPT_LEN = 5
ALL = "all"

# last letters -> the style they name, and the share of prompts of each category, per rule set
NAMING_LETTERS = {"train": {"copy": "ab", "rev": "cd", "rot": "ef", "shift": "gh"},
                 "ood": {"shift": "ab", "rot": "cd", "rev": "ef", "copy": "gh"}}
SHARES = {"train": {ALL: 0.40, "copy": 0.30, "rev": 0.15, "rot": 0.10, "shift": 0.05},
          "ood": {ALL: 0.20, "shift": 0.30, "rot": 0.20, "rev": 0.20, "copy": 0.10}}
ALL_VALID_FIRST = "abc"  # first letters that make every style valid


def transform(style: str, letters: list) -> list:
    if style == "copy":
        return list(letters)
    if style == "rev":
        return list(reversed(letters))
    if style == "rot":
        return list(letters[1:]) + list(letters[:1])
    if style == "shift":
        return [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in letters]
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def style_of(response: str) -> str | None:
    """The style word a response starts with, or None."""
    words = response.split() if isinstance(response, str) else []
    return words[0] if words and words[0] in STYLES else None


def build_tokenizer():
    """A real `transformers` fast tokenizer over the task's words (letters, style words, "="), whitespace split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = specials + list(LETTERS) + list(STYLES) + ["="]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


class StylesTask:
    name = "styles"
    REASONS = REASONS
    STYLES = STYLES

    @staticmethod
    def style_of(response: str) -> str | None:
        """The response's style word (evaluation reports the entropy of its distribution)."""
        return style_of(response)

    def __init__(self, seed: int = 0, n_train: int = 2048, n_test: int = 256, n_ood: int = 256):
        for arg, value in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
        # train and test are disjoint prompts drawn under the same rules; ood under its own rules
        rng = random.Random(f"styles:{seed}:in")
        seen: set = set()
        in_domain = [self._draw(rng, "train", seen) for _ in range(n_train + n_test)]
        rng = random.Random(f"styles:{seed}:ood")
        ood = [self._draw(rng, "ood", seen) for _ in range(n_ood)]
        self._splits = {"train": in_domain[:n_train], "test": in_domain[n_train:], "ood": ood}
        self._splits = {s: [_example(s, i, c, lt) for i, (c, lt) in enumerate(v)] for s, v in self._splits.items()}

    @staticmethod
    def _draw(rng: random.Random, rules: str, seen: set) -> tuple:
        shares = SHARES[rules]
        singles = [c for c in shares if c != ALL]
        while True:  # rejection keeps every prompt unique across all splits (32768 possible, a few thousand used)
            cat = rng.choices(list(shares), weights=list(shares.values()))[0]
            # an every-style prompt draws its last letter as if it were a single-style one
            named = cat if cat != ALL else rng.choices(singles, weights=[shares[c] for c in singles])[0]
            last = rng.choice(NAMING_LETTERS[rules][named])
            first = rng.choice(ALL_VALID_FIRST if cat == ALL else [c for c in LETTERS if c not in ALL_VALID_FIRST])
            letters = [first] + [rng.choice(LETTERS) for _ in range(PROMPT_LEN - 2)] + [last]
            key = "".join(letters)
            if key not in seen:
                seen.add(key)
                return cat, letters

    def examples(self, split: str) -> list:
        return list(self._splits[check_split(split)])

    def score(self, example: Example, response: str) -> Score:
        try:
            words = response.split()
            style = style_of(response)
            if style is None:
                return Score(0.0, "no_style", f"response starts with {words[:1]}")
            if words[1:] != transform(style, example.meta["letters"]):
                return Score(0.0, "bad_transform", f"{style}: got {' '.join(words[1:])!r}, want {example.answer[style]!r}")
            if style not in example.meta["valid"]:
                return Score(0.0, "wrong_style", f"{style} is not valid here; valid: {example.meta['valid']}")
            return Score(1.0, "ok")
        except Exception as e:  # scoring must never crash training; the reason keeps the failure visible
            return Score(0.0, "no_style", f"scorer error: {e!r}")


def _example(split: str, i: int, category: str, letters: list) -> Example:
    valid = list(STYLES) if category == ALL else [category]
    return Example(
        id=f"styles-{split}-{i:05d}",
        prompt=" ".join(letters) + " =",
        answer={s: " ".join(transform(s, letters)) for s in STYLES},
        meta=dict(letters=letters, valid=valid, category=category),
    )
