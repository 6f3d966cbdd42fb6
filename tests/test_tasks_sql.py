"""Generated text-to-SQL and its sandboxed verifier, on real SQLite files (no mocks)."""
import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from dph_train.tasks import Example, Task, get_task
from dph_train.tasks.sql import (
    REASONS,
    SqlTask,
    execute_readonly,
    extract_sql,
    has_order_by,
    results_match,
    score_sql,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return SqlTask(root=tmp_path_factory.mktemp("sqlcache"), seed=0, n_train=200, n_test=60, n_ood=60)


@pytest.fixture(scope="module")
def shop(task):
    return task.db_paths["shop"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def block(sql: str) -> str:
    return f"Here is the query.\n```sql\n{sql}\n```\n"


# ----------------------------------------------------------------------------------------------- generated data


def test_interface_and_splits(task):
    assert isinstance(task, Task) and task.name == "sql" and task.REASONS == REASONS
    train, test, ood = (task.examples(s) for s in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (200, 60, 60)
    assert not {e.prompt for e in train} & {e.prompt for e in test}  # disjoint questions
    assert {e.meta["db_id"] for e in train + test} == {"shop", "school"}
    assert {e.meta["db_id"] for e in ood} == {"library"}  # held-out schema
    ids = [e.id for e in train + test + ood]
    assert len(set(ids)) == len(ids)
    ex = train[0]
    assert "CREATE TABLE" in ex.prompt and "```sql" in ex.prompt and "Question:" in ex.prompt
    with sqlite3.connect(ex.meta["db_path"]) as conn:  # hundreds of rows per database
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 3
    for db in task.db_paths.values():
        with sqlite3.connect(db) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            assert sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables) >= 500


def test_every_gold_query_scores_ok_against_itself(task):
    for split in ("train", "test", "ood"):
        for ex in task.examples(split):
            assert task.score(ex, block(ex.answer)).reason == "ok", (ex.id, ex.answer)


def test_deterministic_from_seed(task, tmp_path):
    again = SqlTask(root=tmp_path, seed=0, n_train=200, n_test=60, n_ood=60)
    assert [e.prompt for e in again.examples("train")] == [e.prompt for e in task.examples("train")]
    assert [e.answer for e in again.examples("ood")] == [e.answer for e in task.examples("ood")]
    for db in ("shop", "school", "library"):
        dump = lambda p: list(sqlite3.connect(p).iterdump())  # noqa: E731
        assert dump(again.db_paths[db]) == dump(task.db_paths[db])
    other = SqlTask(root=tmp_path, seed=1, n_train=20, n_test=5, n_ood=5)
    assert [e.prompt for e in other.examples("train")] != [e.prompt for e in task.examples("train")][:20]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="semantics"):
        SqlTask(root=tmp_path, semantics="multiset")
    with pytest.raises(ValueError, match="timeout_s"):
        SqlTask(root=tmp_path, timeout_s=0)
    with pytest.raises(ValueError, match="split"):
        SqlTask(root=tmp_path, n_train=5, n_test=5, n_ood=5).examples("dev")
    with pytest.raises(ValueError, match="unknown task name"):
        get_task("sqll")


# ----------------------------------------------------------------------------------------------- the verifier


def test_verifier_on_real_sqlite_leaves_the_database_unchanged(task, shop):
    before = sha256(shop)
    siblings_before = sorted(p.name for p in shop.parent.iterdir())
    gold = "SELECT COUNT(*) FROM customers WHERE city = 'Lisbon'"
    ex = Example(id="t", prompt="", answer=gold, meta={"db_path": str(shop), "semantics": "set"})

    def reason(response):
        s = task.score(ex, response)
        assert s.reward == (1.0 if s.reason == "ok" else 0.0)
        return s.reason

    assert reason(block("select count(id) from customers where city='Lisbon';")) == "ok"  # equivalent SQL
    assert reason(block("SELECT COUNT(*) FROM customers WHERE city = 'Porto'")) == "mismatch"
    assert reason(block("DROP TABLE customers")) == "forbidden"
    attached = shop.parent / "evil.sqlite"
    assert reason(block(f"ATTACH DATABASE '{attached}' AS evil")) == "forbidden"
    assert not attached.exists()
    assert reason(block("INSERT INTO customers VALUES (999, 'X', 'Lisbon', 2020)")) == "forbidden"
    assert reason(block("UPDATE customers SET city = 'Lisbon'")) == "forbidden"
    assert reason(block("DELETE FROM customers")) == "forbidden"
    assert reason(block("CREATE TABLE t (x)")) == "forbidden"
    assert reason(block("CREATE TEMP TABLE t AS SELECT 1")) == "forbidden"
    assert reason(block("PRAGMA journal_mode = DELETE")) == "forbidden"
    assert reason(block("BEGIN")) == "forbidden"
    copy = shop.parent / "copy.sqlite"
    assert reason(block(f"VACUUM INTO '{copy}'")) == "forbidden"
    assert not copy.exists()
    assert reason(block("SELECT 1; DROP TABLE customers")) == "exec_error"  # only one statement ever runs
    assert reason(block("SELEC nonsense FROM")) == "exec_error"
    assert reason(block("SELECT * FROM no_such_table")) == "exec_error"
    assert reason(block("SELECT load_extension('/tmp/x.so')")) == "exec_error"  # extensions are off
    assert reason("asdf qwerty }{ ``` ;;; DROP TABLE customers") == "no_sql"  # garbage text
    assert reason("") == "no_sql"
    assert reason(block("")) == "no_sql"
    # A terminating recursive CTE is a read: allowed.
    assert reason(block("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) "
                        "SELECT COUNT(*) FROM c")) == "mismatch"

    after_rows = sqlite3.connect(f"file:{shop}?mode=ro", uri=True).execute("SELECT COUNT(*) FROM customers")
    assert after_rows.fetchone()[0] == 150
    assert sha256(shop) == before
    assert sorted(p.name for p in shop.parent.iterdir()) == siblings_before  # no journal, no new files


def test_never_ending_recursive_cte_is_stopped_in_time(shop):
    before = sha256(shop)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    limit = 0.5
    t0 = time.monotonic()
    s = score_sql(block(endless), "SELECT 1", shop, timeout_s=limit)
    elapsed = time.monotonic() - t0
    assert s.reason == "timeout" and s.reward == 0.0
    assert limit * 0.9 <= elapsed < 2 * limit
    # The same through a task configured with that limit.
    t0 = time.monotonic()
    r = execute_readonly(shop, "SELECT COUNT(*) FROM customers a, customers b, customers c, customers d",
                         timeout_s=0.3)
    assert r.reason == "timeout" and time.monotonic() - t0 < 0.6
    assert sha256(shop) == before


def test_row_cap(shop):
    endless_rows = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    r = execute_readonly(shop, endless_rows, timeout_s=5.0, row_cap=100)
    assert r.reason == "exec_error" and "row_cap" in r.detail
    r = execute_readonly(shop, "SELECT * FROM customers", row_cap=150)
    assert r.reason == "ok" and len(r.rows) == 150
    assert execute_readonly(shop, "SELECT * FROM customers", row_cap=149).reason == "exec_error"


def test_task_timeout_is_configurable(tmp_path):
    t = SqlTask(root=tmp_path, n_train=5, n_test=5, n_ood=5, timeout_s=0.2)
    ex = t.examples("train")[0]
    t0 = time.monotonic()
    s = t.score(ex, block("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c"))
    assert s.reason == "timeout" and time.monotonic() - t0 < 0.4


def test_scoring_never_raises(task, shop):
    ex = task.examples("test")[0]
    junk = [None, 42, b"bytes", "```sql\nSELECT '\x00'\n```", "```sql\n" + "(" * 100_000 + "\n```",
            "```sql\nSELECT randomblob(2000000000)\n```", "\ud800```sql SELECT 1```", "```" * 1000,
            "```sql\nSELECT 1/0, abs(-9223372036854775808)\n```"]
    for response in junk:
        s = task.score(ex, response)
        assert s.reason in REASONS and s.reward in (0.0, 1.0), (response, s)
    # A missing database or a broken gold query is reported, not raised.
    missing = Example(id="m", prompt="", answer="SELECT 1", meta={"db_path": str(shop.parent / "nope.sqlite")})
    assert task.score(missing, block("SELECT 1")).reason == "exec_error"
    broken = Example(id="b", prompt="", answer="SELEC", meta={"db_path": str(shop)})
    s = task.score(broken, block("SELECT 1"))
    assert s.reason == "exec_error" and "gold" in s.detail
    assert task.score(Example(id="e", prompt="", answer="SELECT 1", meta={}), block("SELECT 1")).reason == "exec_error"


# ----------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    "text, want",
    [
        ("```sql\nSELECT 1\n```", "SELECT 1"),
        ("```sql\nSELECT 1\n```\nthen\n```sql\nSELECT 2;\n```", "SELECT 2;"),  # the last block
        ("```SQL\nSELECT 3\n```", "SELECT 3"),
        ("```sqlite\nSELECT 4\n```", "SELECT 4"),
        ("text ```sql SELECT 5``` text", "SELECT 5"),
        ("```sql\nSELECT 6 FROM t WHERE", "SELECT 6 FROM t WHERE"),  # truncated generation
        ("```\nSELECT 7\n```", None),  # untagged fences are not SQL blocks
        ("```python\nprint(1)\n```", None),
        ("```sql\n\n```", None),
        ("SELECT 8", None),
    ],
)
def test_extract_sql(text, want):
    assert extract_sql(text) == want


def test_result_semantics():
    # BIRD: sets of row tuples; duplicates and order do not matter, column order does.
    assert results_match([(1,), (1,), (2,)], [(2,), (1,)], semantics="set")
    assert not results_match([(1, "a")], [("a", 1)], semantics="set")
    assert results_match([(12.0,)], [(12,)], semantics="set")
    # Spider: multisets, columns may be permuted, order only when asked.
    assert not results_match([(1,), (1,), (2,)], [(2,), (1,)], semantics="bag")
    assert results_match([(1, "a"), (2, "b")], [("b", 2), ("a", 1)], semantics="bag")
    assert not results_match([(1, "a"), (2, "b")], [("b", 2), ("a", 1)], semantics="bag", ordered=True)
    assert results_match([(1, "a"), (2, "b")], [("a", 1), ("b", 2)], semantics="bag", ordered=True)
    assert not results_match([(1, "a"), (2, "b")], [("a", 2), ("b", 1)], semantics="bag")  # rows must line up
    assert not results_match([(1, 2)], [(1,)], semantics="bag")
    assert results_match([], [], semantics="bag")
    assert results_match([(1, 1, 2)], [(1, 2, 1)], semantics="bag")
    with pytest.raises(ValueError, match="semantics"):
        results_match([], [], semantics="list")
    assert has_order_by("select a from t ORDER\n BY a") and not has_order_by("select border_by from t")


def test_bag_semantics_order_matters_only_with_order_by(shop):
    gold_ordered = "SELECT name FROM products ORDER BY price DESC LIMIT 3"
    reverse = block("SELECT name FROM (SELECT name, price FROM products ORDER BY price DESC LIMIT 3) ORDER BY price")
    assert score_sql(reverse, gold_ordered, shop, semantics="bag").reason == "mismatch"
    assert score_sql(reverse, gold_ordered, shop, semantics="set").reason == "ok"
    gold_unordered = "SELECT city, COUNT(*) FROM customers GROUP BY city"
    permuted = block("SELECT COUNT(*), city FROM customers GROUP BY city ORDER BY COUNT(*)")
    assert score_sql(permuted, gold_unordered, shop, semantics="bag").reason == "ok"
    assert score_sql(permuted, gold_unordered, shop, semantics="set").reason == "mismatch"
    dup = block("SELECT city FROM customers")
    gold_distinct = "SELECT DISTINCT city FROM customers"
    assert score_sql(dup, gold_distinct, shop, semantics="set").reason == "ok"
    assert score_sql(dup, gold_distinct, shop, semantics="bag").reason == "mismatch"
