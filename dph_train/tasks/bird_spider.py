"""Loaders for the real BIRD and Spider benchmarks, from files the user downloaded (nothing is fetched here).

Official layouts (relative to `root`; override with `layout={"train": (json, db_dir), ...}`):
  BIRD:   train/train.json + train/train_databases/<db_id>/<db_id>.sqlite      (split "train")
          dev/dev.json     + dev/dev_databases/<db_id>/<db_id>.sqlite          (split "test")
          question records: {"db_id", "question", "evidence", "SQL", ...}
  Spider: train_spider.json + database/<db_id>/<db_id>.sqlite                  (split "train")
          dev.json          + database/<db_id>/<db_id>.sqlite                  (split "test")
          question records: {"db_id", "question", "query", ...}
Scoring reuses the generated-SQL verifier (sql.score_sql): set semantics for BIRD, bag semantics for Spider.
As in the paper, Spider is the out-of-domain split of BIRD: pass `spider_root` to BirdTask to get split "ood".
"""
from __future__ import annotations

import json
from pathlib import Path

from . import Example, Score, check_split
from .sql import REASONS, schema_text, score_sql, sql_prompt

BIRD_LAYOUT = {
    "train": ("train/train.json", "train/train_databases"),
    "test": ("dev/dev.json", "dev/dev_databases"),
}
SPIDER_LAYOUT = {
    "train": ("train_spider.json", "database"),
    "test": ("dev.json", "database"),
}


def load_sql_benchmark(
    json_path,
    db_root,
    *,
    benchmark: str,
    split: str,
    gold_key: str,
    semantics: str,
    limit: int | None = None,
) -> list[Example]:
    """Read one official question file; every example points at <db_root>/<db_id>/<db_id>.sqlite."""
    json_path, db_root = Path(json_path), Path(db_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"{benchmark} {split} questions not found: expected {json_path}")
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of question records, got {type(records).__name__}")
    if limit is not None:
        records = records[:limit]
    schemas: dict[str, str] = {}  # one schema read per database, not per question
    examples = []
    for i, rec in enumerate(records):
        missing = [k for k in ("db_id", "question", gold_key) if k not in rec]
        if missing:
            raise ValueError(f"{json_path}: record {i} lacks field(s) {missing}")
        db_id = rec["db_id"]
        db_path = db_root / db_id / f"{db_id}.sqlite"
        if db_id not in schemas:
            if not db_path.is_file():
                raise FileNotFoundError(f"{benchmark} database for db_id {db_id!r} not found: expected {db_path}")
            schemas[db_id] = schema_text(db_path)
        evidence = (rec.get("evidence") or "").strip()
        examples.append(
            Example(
                id=f"{benchmark.lower()}-{split}-{i:05d}",
                prompt=sql_prompt(schemas[db_id], rec["question"].strip(), evidence),
                answer=rec[gold_key],
                meta={"db_id": db_id, "db_path": str(db_path), "semantics": semantics, "benchmark": benchmark},
            )
        )
    return examples


class _SqlBenchmarkTask:
    name = ""
    REASONS = REASONS
    _benchmark, _layout, _gold_key, _semantics = "", {}, "", ""

    def __init__(self, root, *, layout: dict | None = None, limit: int | None = None,
                 timeout_s: float = 15.0, row_cap: int = 10_000):
        if root is None:
            raise ValueError(f"root must be the folder of the downloaded {self._benchmark} files, got None")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.root = Path(root)
        self.layout = {**self._layout, **(layout or {})}
        self.limit, self.timeout_s, self.row_cap = limit, timeout_s, row_cap
        self._cache: dict[str, list[Example]] = {}

    def _load(self, split: str) -> list[Example]:
        if split not in self.layout:
            raise ValueError(f"{self.name} has no {split!r} split; known: {sorted(self.layout)}")
        if split not in self._cache:  # loaded lazily: a user may have downloaded only the dev set
            json_rel, db_rel = self.layout[split]
            self._cache[split] = load_sql_benchmark(
                self.root / json_rel, self.root / db_rel, benchmark=self._benchmark, split=split,
                gold_key=self._gold_key, semantics=self._semantics, limit=self.limit,
            )
        return self._cache[split]

    def examples(self, split: str) -> list[Example]:
        return list(self._load(check_split(split)))

    def score(self, example: Example, response: str) -> Score:
        meta = example.meta if isinstance(example.meta, dict) else {}
        return score_sql(response, str(example.answer), meta.get("db_path", ""),
                         semantics=meta.get("semantics", self._semantics),
                         timeout_s=self.timeout_s, row_cap=self.row_cap)


class SpiderTask(_SqlBenchmarkTask):
    """Spider 1.0: bag semantics, column permutations allowed, row order only when the gold has ORDER BY."""

    name = "spider"
    _benchmark, _layout, _gold_key, _semantics = "Spider", SPIDER_LAYOUT, "query", "bag"


class BirdTask(_SqlBenchmarkTask):
    """BIRD: set semantics; the question's "evidence" is given as a hint. Split "ood" = Spider dev if spider_root."""

    name = "bird"
    _benchmark, _layout, _gold_key, _semantics = "BIRD", BIRD_LAYOUT, "SQL", "set"

    def __init__(self, root, *, spider_root=None, spider_layout: dict | None = None, **kwargs):
        super().__init__(root, **kwargs)
        self.spider = None if spider_root is None else SpiderTask(spider_root, layout=spider_layout, **kwargs)

    def examples(self, split: str) -> list[Example]:
        if check_split(split) == "ood":
            if self.spider is None:
                raise ValueError("BirdTask has no 'ood' split unless spider_root (the Spider folder) is given")
            # Spider examples carry semantics="bag" in their meta, so score() grades them the Spider way.
            return [Example(e.id.replace("spider-test", "spider-ood"), e.prompt, e.answer, e.meta)
                    for e in self.spider.examples("test")]
        return super().examples(split)
