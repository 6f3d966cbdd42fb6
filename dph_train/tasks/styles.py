"""A multi-style task where GRPO's diversity collapse (and DPH-RL's cure) can be watched on a 2-core CPU.

A prompt is five letters from a..h; a response is a style word, then that style's transform of the letters:

    prompt "c a f b h ="     copy  -> "copy c a f b h"     rev   -> "rev h b f a c"
                             rot   -> "rot a f b h c"      shift -> "shift d b g c a"   (each letter + 1, h -> a)

The reward is 1 only when the transform is exact AND the style is valid for the prompt. Two features of the prompt,
both easy for a model to read, decide which styles are valid:

    the FIRST letter is a, b or c   -> every style is valid (40% of prompts: they become D_pef under the 8/8 rule)
    otherwise the LAST letter (the one just before "=") names the one valid style:
        train / test   a b -> copy (30%)    c d -> rev (15%)    e f -> rot (10%)    g h -> shift (5%)
        ood-remap      the last letters are re-mapped and the shares change (never trained on: a conflicting rule that
                       cannot be inferred from the prompt, so a policy that learned the training rule must lose here):
                       a b -> shift (30%)   c d -> rot (20%)    e f -> rev (20%)    g h -> copy (10%);  every style 20%
        ood-shift      the training rule, only the single-style shares reversed (same skill, new distribution):
                       a b -> copy (5%)     c d -> rev (10%)    e f -> rot (15%)    g h -> shift (30%); every style 40%

The last letter of an every-style prompt follows the same shares as on the other prompts, so D_pef and D_exp
prompts share their last letters: what the divergence term keeps on D_pef is the very choice GRPO makes on D_exp.
(The style-naming letter sits next to "=" on purpose: with the roles of the first and last letters swapped, no method
learned the cue within 150 RL steps on the 2-layer model — every policy's style choice stayed prompt-independent.)

A model that samples every style about equally (what `dph_train.sft.sft_styles` trains) solves a single-style prompt
with probability ~1/4 per sample, so its Pass@16 is near 1 while its Pass@1 is near 0.55. "copy" is valid on 70% of
training prompts, so a policy that collapses onto it gains Pass@1 and loses every prompt that needs another style.

Forgetting probes: skills SFT teaches and RL never trains. SFT learns them from "t2-train"; none of them is in
"train", so presample, D_pef and RL never see them; "t2a" / "t2b" are their held-out test prompts. A probe prompt is
a marker word, five letters, "=":

    t2a   "x c a f b h ="  -> "swap a c b f h"   (adjacent pairs swapped: a disjoint output, a word no style uses)
    t2b   "y c a f b h ="  -> "rot a f b h c"    (always one existing style: an output RL does train)

Every prompt is unique across all splits, and the splits that existed before the probes keep their prompts.

Spelling (StylesTask(spelling=...)): "toy" (the default, above) names the styles copy / rev / rot / shift for the tiny
word-level tokenizer. "words" is the same task for a real pretrained tokenizer (SmolLM2's): the styles are named
copy / reverse / rotate / shift, words SmolLM2 keeps as one token each at the start of a response (the chat template's
assistant header ends with a newline, so the first word has no leading space; the letters after it are " a" .. " h",
one token each). Prompts, rules, shares and every split's prompts are those of the toy; only the style words differ.
"words" also has the keep-rate split "probes" (data/keep_probes.jsonl): short questions with one answer each
(capitals, next weekday / month, opposites, small sums) that a pretrained model already answers and RL never trains.
`probes_screened` (the JSON file compare's screening writes: the ids the starting model answers right greedily) keeps
only those, so that the split's greedy accuracy is the keep-rate.
"""
from __future__ import annotations

import json
import os
import random
import re

from . import Example, Score, check_split

LETTERS = "abcdefgh"
STYLES = ("copy", "rev", "rot", "shift")
WORDS = STYLES + ("swap",)  # every transform word; "swap" answers only the t2a probes (it is not a style)
REASONS = ("ok", "wrong_style", "bad_transform", "no_style", "wrong_answer")  # wrong_answer: a keep-rate probe
PROMPT_LEN = 5
ALL = "all"

# last letters -> the style they name, per rule set; the share of prompts of each category, per split kind
NAMING_LETTERS = {"train": {"copy": "ab", "rev": "cd", "rot": "ef", "shift": "gh"},
                  "remap": {"shift": "ab", "rot": "cd", "rev": "ef", "copy": "gh"}}
SHARES = {"train": {ALL: 0.40, "copy": 0.30, "rev": 0.15, "rot": 0.10, "shift": 0.05},
          "remap": {ALL: 0.20, "shift": 0.30, "rot": 0.20, "rev": 0.20, "copy": 0.10},
          "shift": {ALL: 0.40, "copy": 0.05, "rev": 0.10, "rot": 0.15, "shift": 0.30}}
ALL_VALID_FIRST = "abc"  # first letters that make every style valid
# forgetting probes: marker word -> the one word that answers it
T2_MARKERS = {"t2a": "x", "t2b": "y"}
T2_ANSWER = {"t2a": "swap", "t2b": "rot"}
# spelling -> the words of STYLES, in STYLES' order (the rules above are written with the toy's names)
SPELLINGS = {"toy": STYLES, "words": ("copy", "reverse", "rotate", "shift")}
PROBE_SPLIT = "probes"  # the keep-rate probes ("words" spelling only)
PROBES_FILE = os.path.join(os.path.dirname(__file__), "data", "keep_probes.jsonl")
PROBE_WORDS = 10  # a probe is answered when its answer is among the first this many words of the response's first line


def transform(style: str, letters: list) -> list:
    if style == "copy":
        return list(letters)
    if style == "rev":
        return list(reversed(letters))
    if style == "rot":
        return list(letters[1:]) + list(letters[:1])
    if style == "shift":
        return [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in letters]
    if style == "swap":  # l2 l1 l4 l3 l5: swap adjacent pairs, an odd last letter stays
        out = list(letters)
        for i in range(0, len(out) - 1, 2):
            out[i], out[i + 1] = out[i + 1], out[i]
        return out
    raise ValueError(f"style must be one of {WORDS}, got {style!r}")


def style_of(response: str, styles: tuple = STYLES) -> str | None:
    """The style word (one of `styles`) a response starts with, or None."""
    words = response.split() if isinstance(response, str) else []
    return words[0] if words and words[0] in styles else None


def load_probes(path: str = PROBES_FILE) -> list:
    """The shipped keep-rate probes: [{"id", "prompt", "answers": [accepted answer words]}]."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def probe_answered(response: str, answers: list) -> bool:
    """Lenient: an accepted answer (case-insensitive, whole words) is among the first PROBE_WORDS words of the
    response's first non-empty line. A 135M model answers "The capital of France is Paris." as often as "Paris"."""
    lines = [ln for ln in (response or "").splitlines() if ln.strip()]
    words = re.findall(r"[a-z0-9]+", lines[0].lower())[:PROBE_WORDS] if lines else []
    return any(all(w in words for w in re.findall(r"[a-z0-9]+", a.lower())) for a in answers)


def build_tokenizer():
    """A real `transformers` fast tokenizer over the task's words (letters, style words, "=", then the probes' marker
    words and "swap"), whitespace split. The probes' words come last so that every older word keeps its token id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = specials + list(LETTERS) + list(STYLES) + ["="] + list(T2_MARKERS.values()) + ["swap"]
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
    SPLITS = ("train", "test", "ood-remap", "ood-shift", "t2a", "t2b", "t2-train")

    def style_of(self, response: str) -> str | None:
        """The response's style word (evaluation reports the entropy of its distribution)."""
        return style_of(response, self.STYLES)

    def __init__(self, seed: int = 0, n_train: int = 2048, n_test: int = 256, n_ood: int = 256, n_t2: int = 128,
                 n_t2_train: int = 512, spelling: str = "toy", probes_screened: str | None = None):
        """n_ood sizes each ood split; n_t2 / n_t2_train: probes per kind (t2a and t2b) in t2a, t2b / t2-train.
        spelling: "toy" | "words" (the module docstring); probes_screened ("words" only): a screening file, whose
        "kept" ids are the probes the "probes" split keeps (None: every shipped probe)."""
        if spelling not in SPELLINGS:
            raise ValueError(f"spelling must be one of {tuple(SPELLINGS)}, got {spelling!r}")
        if probes_screened is not None and spelling != "words":
            raise ValueError("probes_screened needs spelling='words' (the toy tokenizer cannot spell the probes)")
        # the instance's names: the class attributes stay the toy's (config validation reads StylesTask.SPLITS)
        self.STYLES = SPELLINGS[spelling]
        self.SPLITS = StylesTask.SPLITS + ((PROBE_SPLIT,) if spelling == "words" else ())
        self._word = dict(zip(STYLES, self.STYLES))  # the rules' style name -> this spelling's word
        self._rule = {w: st for st, w in self._word.items()} | {"swap": "swap"}  # and back
        for arg, value in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood), ("n_t2", n_t2),
                           ("n_t2_train", n_t2_train)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
        # train and test are disjoint prompts drawn under the same rules; ood-remap under its own rules. Each later
        # split has its own rng stream and is drawn after these, so adding splits never moves an existing prompt.
        rng = random.Random(f"styles:{seed}:in")
        seen: set = set()
        in_domain = [self._draw(rng, "train", "train", seen) for _ in range(n_train + n_test)]
        rng = random.Random(f"styles:{seed}:ood")
        remap = [self._draw(rng, "remap", "remap", seen) for _ in range(n_ood)]
        rng = random.Random(f"styles:{seed}:ood-shift")
        shift = [self._draw(rng, "train", "shift", seen) for _ in range(n_ood)]
        splits = {"train": in_domain[:n_train], "test": in_domain[n_train:], "ood-remap": remap, "ood-shift": shift}
        splits = {s: [_example(s, i, c, lt, self._word) for i, (c, lt) in enumerate(v)] for s, v in splits.items()}
        rng = random.Random(f"styles:{seed}:t2")
        t2_train = []
        for kind in T2_MARKERS:
            probes = [self._draw_t2(rng, kind, seen) for _ in range(n_t2 + n_t2_train)]
            splits[kind] = [_t2_example(kind, i, kind, lt, self._word) for i, lt in enumerate(probes[:n_t2])]
            t2_train += [(kind, lt) for lt in probes[n_t2:]]
        splits["t2-train"] = [_t2_example("t2-train", i, kind, lt, self._word) for i, (kind, lt) in enumerate(t2_train)]
        if spelling == "words":
            probes = load_probes()
            if probes_screened is not None:
                with open(probes_screened) as f:
                    kept = set(json.load(f)["kept"])
                probes = [p for p in probes if p["id"] in kept]
            splits[PROBE_SPLIT] = [Example(id=f"styles-probes-{p['id']}", prompt=p["prompt"], answer=p["answers"],
                                           meta=dict(category="probe", probe_id=p["id"])) for p in probes]
        self._splits = splits

    @staticmethod
    def _draw(rng: random.Random, rules: str, shares: str, seen: set) -> tuple:
        """A (category, letters) pair: `rules` names the letters that decide the style (NAMING_LETTERS), `shares`
        the category mix (SHARES)."""
        naming, shares = NAMING_LETTERS[rules], SHARES[shares]
        singles = [c for c in shares if c != ALL]
        while True:  # rejection keeps every prompt unique across all splits (32768 possible, a few thousand used)
            cat = rng.choices(list(shares), weights=list(shares.values()))[0]
            # an every-style prompt draws its last letter as if it were a single-style one
            named = cat if cat != ALL else rng.choices(singles, weights=[shares[c] for c in singles])[0]
            last = rng.choice(naming[named])
            first = rng.choice(ALL_VALID_FIRST if cat == ALL else [c for c in LETTERS if c not in ALL_VALID_FIRST])
            letters = [first] + [rng.choice(LETTERS) for _ in range(PROMPT_LEN - 2)] + [last]
            key = "".join(letters)
            if key not in seen:
                seen.add(key)
                return cat, letters

    @staticmethod
    def _draw_t2(rng: random.Random, kind: str, seen: set) -> list:
        while True:  # the marker makes a probe differ from every style prompt; `seen` keeps probes unique
            letters = [rng.choice(LETTERS) for _ in range(PROMPT_LEN)]
            key = T2_MARKERS[kind] + "".join(letters)
            if key not in seen:
                seen.add(key)
                return letters

    def examples(self, split: str) -> list:
        return list(self._splits[check_split(split, self.SPLITS)])

    def category_group(self, example: Example) -> str | None:
        """"all-valid" | "single-style" for the style prompts (evaluation reports each group apart), None for the
        forgetting and keep-rate probes."""
        category = example.meta["category"]
        if category == ALL:
            return "all-valid"
        return "single-style" if category in self.STYLES else None

    def score(self, example: Example, response: str) -> Score:
        try:
            if example.meta["category"] == "probe":
                if probe_answered(response, example.answer):
                    return Score(1.0, "ok")
                return Score(0.0, "wrong_answer", f"want one of {example.answer}, got {response[:40]!r}")
            words = response.split()
            style = words[0] if words and words[0] in self._rule else None  # "swap" too: a probe's answer word
            if style is None:
                return Score(0.0, "no_style", f"response starts with {words[:1]}")
            want = transform(self._rule[style], example.meta["letters"])
            if words[1:] != want:
                return Score(0.0, "bad_transform", f"{style}: got {' '.join(words[1:])!r}, want {' '.join(want)!r}")
            if style not in example.meta["valid"]:
                return Score(0.0, "wrong_style", f"{style} is not valid here; valid: {example.meta['valid']}")
            return Score(1.0, "ok")
        except Exception as e:  # scoring must never crash training; the reason keeps the failure visible
            return Score(0.0, "no_style", f"scorer error: {e!r}")


def _example(split: str, i: int, category: str, letters: list, word: dict) -> Example:
    """word: the rules' style name -> the spelling's word (categories, valid styles and answers are spelled)."""
    valid = [word[s] for s in STYLES] if category == ALL else [word[category]]
    return Example(
        id=f"styles-{split}-{i:05d}",
        prompt=" ".join(letters) + " =",
        answer={word[s]: " ".join(transform(s, letters)) for s in STYLES},
        meta=dict(letters=letters, valid=valid, category=word.get(category, category)),
    )


def _t2_example(split: str, i: int, kind: str, letters: list, word: dict) -> Example:
    """A forgetting probe: one valid answer word, so the answer is that word's transform alone."""
    rule = T2_ANSWER[kind]
    word = word.get(rule, rule)
    return Example(
        id=f"styles-{split}-{i:05d}",
        prompt=" ".join([T2_MARKERS[kind]] + letters) + " =",
        answer={word: " ".join(transform(rule, letters))},
        meta=dict(letters=letters, valid=[word], category=kind),
    )
