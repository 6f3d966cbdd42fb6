"""BIRD / Spider loaders on tiny datasets written here in the official layout (real files, real SQLite)."""
import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from dph_train.tasks import get_task
from dph_train.tasks.bird_spider import BirdTask, SpiderTask


def make_db(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER);
        INSERT INTO singer VALUES (1, 'Ana', 'France', 30), (2, 'Ben', 'France', 41), (3, 'Caro', 'Spain', 25),
                                  (4, 'Dan', 'Spain', 52), (5, 'Eve', 'Italy', 33);
        """
    )
    conn.commit()
    conn.close()
    return path


def write_json(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")


@pytest.fixture
def bird_root(tmp_path):
    root = tmp_path / "bird"
    for split, folder in (("train", "train/train_databases"), ("dev", "dev/dev_databases")):
        make_db(root / folder / "concert" / "concert.sqlite")
    write_json(root / "train" / "train.json", [
        {"db_id": "concert", "question": "How many singers are from France?", "evidence": "France is a country",
         "SQL": "SELECT COUNT(*) FROM singer WHERE country = 'France'"},
        {"db_id": "concert", "question": "Name the singers older than 40.", "evidence": "",
         "SQL": "SELECT name FROM singer WHERE age > 40"},
    ])
    write_json(root / "dev" / "dev.json", [
        {"question_id": 0, "db_id": "concert", "question": "Which countries have singers?",
         "evidence": "", "SQL": "SELECT DISTINCT country FROM singer", "difficulty": "simple"},
    ])
    return root


@pytest.fixture
def spider_root(tmp_path):
    root = tmp_path / "spider"
    make_db(root / "database" / "concert_singer" / "concert_singer.sqlite")
    write_json(root / "train_spider.json", [
        {"db_id": "concert_singer", "question": "How many singers are there?", "query": "SELECT count(*) FROM singer",
         "query_toks": [], "question_toks": [], "sql": {}},
    ])
    write_json(root / "dev.json", [
        {"db_id": "concert_singer", "question": "List name and age of singers, oldest first.",
         "query": "SELECT name, age FROM singer ORDER BY age DESC"},
        {"db_id": "concert_singer", "question": "List the country of every singer.",
         "query": "SELECT country FROM singer"},
    ])
    return root


def sql(q: str) -> str:
    return f"```sql\n{q}\n```"


def test_bird_loads_official_layout_and_scores_with_set_semantics(bird_root):
    task = get_task("bird", root=bird_root)
    assert isinstance(task, BirdTask) and task.name == "bird"
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 2 and len(test) == 1
    ex = train[0]
    assert ex.answer == "SELECT COUNT(*) FROM singer WHERE country = 'France'"
    assert "CREATE TABLE singer" in ex.prompt and "How many singers are from France?" in ex.prompt
    assert "Hint: France is a country" in ex.prompt
    assert "Hint:" not in train[1].prompt
    assert ex.meta["db_path"] == str(bird_root / "train/train_databases/concert/concert.sqlite")
    assert ex.meta["semantics"] == "set"
    assert task.score(ex, sql("SELECT count(singer_id) FROM singer WHERE country='France'")).reason == "ok"
    assert task.score(ex, sql("SELECT COUNT(*) FROM singer")).reason == "mismatch"
    # Set semantics: duplicates do not matter for BIRD.
    assert task.score(test[0], sql("SELECT country FROM singer")).reason == "ok"


def test_bird_verifier_is_sandboxed(bird_root):
    task = BirdTask(bird_root, timeout_s=0.5)
    ex = task.examples("test")[0]
    db = Path(ex.meta["db_path"])
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert task.score(ex, sql("DELETE FROM singer")).reason == "forbidden"
    assert task.score(ex, sql("DROP TABLE singer")).reason == "forbidden"
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    assert task.score(ex, sql(endless)).reason == "timeout"
    assert task.score(ex, "no query here").reason == "no_sql"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_spider_bag_semantics(spider_root):
    task = get_task("spider", root=spider_root)
    assert isinstance(task, SpiderTask) and task.name == "spider"
    assert len(task.examples("train")) == 1
    ordered, countries = task.examples("test")
    assert ordered.meta["semantics"] == "bag"
    assert ordered.meta["db_path"] == str(spider_root / "database/concert_singer/concert_singer.sqlite")
    # Column permutation is allowed; the gold has ORDER BY, so the row order must match.
    assert task.score(ordered, sql("SELECT age, name FROM singer ORDER BY age DESC")).reason == "ok"
    assert task.score(ordered, sql("SELECT name, age FROM singer ORDER BY age")).reason == "mismatch"
    # No ORDER BY in the gold: any order, but duplicates count (bag, not set).
    assert task.score(countries, sql("SELECT country FROM singer ORDER BY country")).reason == "ok"
    assert task.score(countries, sql("SELECT DISTINCT country FROM singer")).reason == "mismatch"
    with pytest.raises(ValueError, match="'ood'"):
        task.examples("ood")


def test_bird_ood_split_is_spider_dev_graded_as_spider(bird_root, spider_root):
    with pytest.raises(ValueError, match="spider_root"):
        BirdTask(bird_root).examples("ood")
    task = BirdTask(bird_root, spider_root=spider_root)
    ood = task.examples("ood")
    assert [e.id for e in ood] == ["spider-ood-00000", "spider-ood-00001"]
    assert task.score(ood[1], sql("SELECT DISTINCT country FROM singer")).reason == "mismatch"  # bag semantics
    assert task.score(ood[1], sql("SELECT country FROM singer")).reason == "ok"


def test_missing_files_name_the_expected_path(tmp_path, bird_root, spider_root):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing" / "dev" / "dev.json"))):
        BirdTask(tmp_path / "nothing").examples("test")
    (bird_root / "dev/dev_databases/concert/concert.sqlite").unlink()
    expected = bird_root / "dev/dev_databases/concert/concert.sqlite"
    with pytest.raises(FileNotFoundError, match="'concert'.*" + re.escape(str(expected))):
        BirdTask(bird_root).examples("test")
    assert len(BirdTask(bird_root).examples("train")) == 2  # splits load independently
    (spider_root / "train_spider.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_spider.json"):
        SpiderTask(spider_root).examples("train")


def test_layout_override_and_limit(tmp_path, bird_root):
    # A user who unzipped only the dev set somewhere else.
    dev = tmp_path / "dev_20240627"
    make_db(dev / "dev_databases" / "concert" / "concert.sqlite")
    write_json(dev / "dev.json", [{"db_id": "concert", "question": f"q{i}", "evidence": "", "SQL": "SELECT 1"}
                                  for i in range(5)])
    task = BirdTask(tmp_path, layout={"test": ("dev_20240627/dev.json", "dev_20240627/dev_databases")}, limit=3)
    assert len(task.examples("test")) == 3
    write_json(dev / "dev.json", [{"db_id": "concert", "question": "q"}])
    with pytest.raises(ValueError, match="lacks field"):
        BirdTask(tmp_path, layout={"test": ("dev_20240627/dev.json", "dev_20240627/dev_databases")}).examples("test")


@pytest.mark.parametrize("env, cls", [("DPH_BIRD_ROOT", BirdTask), ("DPH_SPIDER_ROOT", SpiderTask)])
def test_real_benchmark_if_present(env, cls):
    """Runs on the real downloaded dataset when its folder is given in the environment; skipped otherwise."""
    root = os.environ.get(env)
    if not root:
        pytest.skip(f"set {env} to the downloaded dataset folder to run this")
    task = cls(root, limit=20)
    examples = task.examples("test")
    assert examples
    ok = sum(task.score(e, sql(e.answer)).reason == "ok" for e in examples)
    assert ok >= 0.9 * len(examples)  # gold against itself; a few gold queries may exceed the time limit
