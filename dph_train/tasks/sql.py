"""Text-to-SQL on small SQLite databases generated from a seed, and the sandboxed SQL verifier.

Databases: "shop" and "school" are in-domain (train / test share their templates, never a question); "library" is
held out entirely for the out-of-domain split. The prompt holds the CREATE TABLE text and the question; the response
must put its query in a ```sql block.

Reward (also used by the BIRD / Spider loaders): run the LAST ```sql block and the gold query, compare the results.
  - "set" semantics (BIRD): set of row tuples equal.
  - "bag" semantics (Spider): multisets of rows equal, up to a permutation of the columns; the row order matters
    only when the gold query has ORDER BY.
Sandbox, every layer real: the file is opened read-only (`mode=ro` URI), an authorizer denies everything except
SELECT / READ / FUNCTION / RECURSIVE (so writes, DDL, ATTACH, VACUUM, PRAGMA, transactions are refused at prepare
time), a progress handler enforces a wall-clock limit, and at most `row_cap` rows are fetched.
"""
from __future__ import annotations

import os
import random
import re
import sqlite3
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import Example, Score, check_split

REASONS = ("ok", "mismatch", "no_sql", "exec_error", "timeout", "forbidden")

# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------

_SQL_FENCE = re.compile(r"```[ \t]*(?:sqlite|sql)\b", re.IGNORECASE)


def extract_sql(response: str) -> str | None:
    """The content of the last ```sql block (an unclosed final block counts: generations get truncated)."""
    if not isinstance(response, str):
        return None
    fences = list(_SQL_FENCE.finditer(response))
    if not fences:
        return None
    rest = response[fences[-1].end() :]
    close = rest.find("```")
    sql = (rest if close < 0 else rest[:close]).strip()
    return sql or None


# ---------------------------------------------------------------------------------------------------------------
# Sandboxed execution
# ---------------------------------------------------------------------------------------------------------------

# Reading data and calling functions is all a query needs; RECURSIVE (33, not exported by every Python) is what a
# WITH RECURSIVE CTE asks for. Every other action (writes, DDL, ATTACH, PRAGMA, transactions, ...) is denied.
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33})
# Names for the denial message only (error codes share these integers, so they are listed explicitly).
_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{n}"): n
    for n in ("CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
              "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE",
              "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER",
              "DROP_VIEW", "INSERT", "PRAGMA", "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE",
              "REINDEX", "ANALYZE", "CREATE_VTABLE", "DROP_VTABLE", "SAVEPOINT")
    if hasattr(sqlite3, f"SQLITE_{n}")
}
_MAX_VALUE_BYTES = 10_000_000  # largest string / blob / statement a query may build
_PROGRESS_EVERY = 1000  # VM instructions between deadline checks: cheap, and fine-grained enough for ms limits


@dataclass(frozen=True)
class ExecResult:
    reason: str  # "ok" | "exec_error" | "timeout" | "forbidden"
    rows: tuple | None = None  # the fetched rows (tuples) when reason == "ok"
    detail: str = ""


def _decode_text(b: bytes) -> str:
    # Some real databases (BIRD) hold non-UTF-8 text; replacing bad bytes beats failing the whole query.
    return b.decode("utf-8", errors="replace")


def execute_readonly(db_path, sql: str, *, timeout_s: float = 1.0, row_cap: int = 10_000) -> ExecResult:
    """Run one SELECT-only statement on a database opened read-only. Never raises."""
    path = Path(db_path)
    if not path.is_file():
        return ExecResult("exec_error", detail=f"database not found: {path}")
    state = {"denied": None, "timed_out": False, "deadline": float("inf")}

    def authorizer(action, arg1, arg2, dbname, source):
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        state["denied"] = state["denied"] or f"{_ACTION_NAMES.get(action, action)} {arg1 or ''}".strip()
        return sqlite3.SQLITE_DENY

    def progress():
        if time.monotonic() > state["deadline"]:
            state["timed_out"] = True
            return 1  # non-zero aborts the statement with "interrupted"
        return 0

    conn = None
    try:
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=timeout_s)
        conn.text_factory = _decode_text
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # second lock on ATTACH, besides the authorizer
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)  # randomblob(10**9) would eat the RAM
        conn.set_authorizer(authorizer)
        conn.set_progress_handler(progress, _PROGRESS_EVERY)
        state["deadline"] = time.monotonic() + timeout_s
        cursor = conn.execute(sql)
        rows = cursor.fetchmany(row_cap + 1)  # the progress handler also guards the fetch
        if len(rows) > row_cap:
            return ExecResult("exec_error", detail=f"result has more than row_cap={row_cap} rows")
        return ExecResult("ok", rows=tuple(tuple(r) for r in rows))
    except Exception as e:  # sqlite3.Error, but also e.g. ValueError on NUL characters, OverflowError
        if state["denied"] is not None:
            return ExecResult("forbidden", detail=f"denied {state['denied']}: {e}")
        if state["timed_out"]:
            return ExecResult("timeout", detail=f"stopped after {timeout_s} s")
        return ExecResult("exec_error", detail=f"{type(e).__name__}: {e}")
    finally:
        if conn is not None:
            conn.close()


_GOLD_CACHE: dict[tuple, ExecResult] = {}
_GOLD_CACHE_SIZE = 8192


def _gold_result(db_path: Path, sql: str, timeout_s: float, row_cap: int) -> ExecResult:
    # Gold queries repeat for every rollout of a prompt and the database is read-only, so successful results are
    # cached (keyed by the file's mtime for safety). Failures are not: a timeout under load should get a retry.
    key = (str(db_path), db_path.stat().st_mtime_ns, sql, row_cap)
    hit = _GOLD_CACHE.get(key)
    if hit is not None:
        return hit
    result = execute_readonly(db_path, sql, timeout_s=timeout_s, row_cap=row_cap)
    if result.reason == "ok":
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[key] = result
    return result


# ---------------------------------------------------------------------------------------------------------------
# Result comparison
# ---------------------------------------------------------------------------------------------------------------

_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


def has_order_by(sql: str) -> bool:
    return bool(_ORDER_BY.search(sql))


def results_match(pred, gold, *, semantics: str = "set", ordered: bool = False) -> bool:
    """Compare two result sets (sequences of row tuples). semantics: "set" (BIRD) or "bag" (Spider)."""
    if semantics == "set":
        return set(map(tuple, pred)) == set(map(tuple, gold))
    if semantics == "bag":
        return _bag_match([tuple(r) for r in pred], [tuple(r) for r in gold], ordered)
    raise ValueError(f"semantics must be 'set' or 'bag', got {semantics!r}")


def _bag_match(pred: list[tuple], gold: list[tuple], ordered: bool, max_tries: int = 10_000) -> bool:
    # Spider test-suite semantics: same number of rows and columns, equal as multisets (or lists when ordered)
    # after some permutation of the predicted columns.
    if len(pred) != len(gold):
        return False
    if not gold:
        return True
    ncol = len(gold[0])
    if any(len(r) != ncol for r in pred) or any(len(r) != ncol for r in gold):
        return False
    # Only columns holding the same multiset of values can be mapped onto each other: prunes the permutations.
    gold_cols = [Counter(r[j] for r in gold) for j in range(ncol)]
    pred_cols = [Counter(r[j] for r in pred) for j in range(ncol)]
    candidates = [[i for i in range(ncol) if pred_cols[i] == gold_cols[j]] for j in range(ncol)]
    if any(not c for c in candidates):
        return False
    gold_bag = None if ordered else Counter(gold)
    tries = 0

    def search(j: int, perm: list[int]) -> bool:
        nonlocal tries
        if j == ncol:
            tries += 1
            permuted = [tuple(r[i] for i in perm) for r in pred]
            return permuted == gold if ordered else Counter(permuted) == gold_bag
        for i in candidates[j]:
            if i not in perm and tries < max_tries:
                if search(j + 1, perm + [i]):
                    return True
        return False

    return search(0, [])


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def score_sql(
    response: str,
    gold_sql: str,
    db_path,
    *,
    semantics: str = "set",
    timeout_s: float = 1.0,
    row_cap: int = 10_000,
) -> Score:
    """Reward 1 iff the last ```sql block of `response` returns the gold query's result. Never raises."""
    try:
        sql = extract_sql(response)
        if sql is None:
            return Score(0.0, "no_sql")
        pred = execute_readonly(db_path, sql, timeout_s=timeout_s, row_cap=row_cap)
        if pred.reason != "ok":
            return Score(0.0, pred.reason, pred.detail)
        gold = _gold_result(Path(db_path), gold_sql, timeout_s, row_cap)
        if gold.reason != "ok":  # a data problem, not the model's: say so in the detail
            return Score(0.0, "exec_error", f"gold query failed ({gold.reason}): {gold.detail}")
        ordered = semantics == "bag" and has_order_by(gold_sql)
        if results_match(pred.rows, gold.rows, semantics=semantics, ordered=ordered):
            return Score(1.0, "ok")
        return Score(0.0, "mismatch")
    except Exception as e:  # last guard: scoring must never crash training, and the reason stays visible
        return Score(0.0, "exec_error", f"scorer error: {type(e).__name__}: {e}")


def schema_text(db_path) -> str:
    """The CREATE statements of a database (tables and views), as stored by SQLite."""
    uri = f"file:{urllib.parse.quote(str(Path(db_path).resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.text_factory = _decode_text
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('table', 'view') AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()
    return "\n\n".join(r[0].strip() + ";" for r in rows)


def sql_prompt(schema: str, question: str, evidence: str = "") -> str:
    parts = [f"Database schema (SQLite):\n{schema}", f"Question: {question}"]
    if evidence:
        parts.append(f"Hint: {evidence}")
    parts.append("Answer with one SQLite query in a ```sql code block.")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# The generated databases
# ---------------------------------------------------------------------------------------------------------------

_GENERATOR_VERSION = 1  # bump when the data or the templates change, so cached databases are rebuilt
IN_DOMAIN_DBS = ("shop", "school")
OOD_DBS = ("library",)

_FIRST = ["Ana", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kenji", "Lena",
          "Marco", "Nadia", "Omar", "Paula", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Yara"]
_LAST = ["Silva", "Novak", "Kim", "Okafor", "Rossi", "Meyer", "Haddad", "Lopez", "Tanaka", "Berg", "Costa",
         "Dubois", "Ivanova", "Jensen", "Khan", "Moreau", "Nguyen", "Park", "Quist", "Weber"]
_CITIES = ["Lisbon", "Porto", "Madrid", "Lyon", "Berlin", "Oslo", "Vienna", "Prague"]
_ADJ = ["Blue", "Silent", "Golden", "Little", "Brave", "Hidden", "Quiet", "Bright", "Broken", "Wild", "Crimson",
        "Frozen", "Gentle", "Hollow", "Lost", "Northern"]
_NOUN = ["River", "Lamp", "Garden", "Mountain", "Harbor", "Forest", "Window", "Bridge", "Clock", "Island",
         "Road", "Letter", "Tower", "Meadow", "Storm", "Mirror"]


def _people(rng: random.Random, n: int) -> list[str]:
    names = [f"{f} {l}" for f in _FIRST for l in _LAST]
    return rng.sample(names, n)  # unique, so "the customer X" names one row


def _phrases(rng: random.Random, n: int) -> list[str]:
    return rng.sample([f"{a} {b}" for a in _ADJ for b in _NOUN], n)


def _build_shop(rng: random.Random):
    ddl = [
        "CREATE TABLE customers (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL,\n  city TEXT NOT NULL,\n"
        "  signup_year INTEGER NOT NULL\n)",
        "CREATE TABLE products (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL,\n  category TEXT NOT NULL,\n"
        "  price REAL NOT NULL\n)",
        "CREATE TABLE orders (\n  id INTEGER PRIMARY KEY,\n  customer_id INTEGER NOT NULL REFERENCES customers(id),\n"
        "  product_id INTEGER NOT NULL REFERENCES products(id),\n  quantity INTEGER NOT NULL,\n"
        "  order_year INTEGER NOT NULL\n)",
    ]
    categories = ["books", "garden", "kitchen", "toys", "sports", "music"]
    customers = [(i + 1, n, rng.choice(_CITIES), rng.randint(2015, 2024)) for i, n in enumerate(_people(rng, 150))]
    # Prices are distinct so "the k most expensive" has one right answer.
    prices = rng.sample(range(199, 49_999), 80)
    products = [(i + 1, n, rng.choice(categories), prices[i] / 100) for i, n in enumerate(_phrases(rng, 80))]
    orders = [(i + 1, rng.randint(1, 150), rng.randint(1, 80), rng.randint(1, 5), rng.randint(2018, 2024))
              for i in range(600)]
    data = {"customers": customers, "products": products, "orders": orders}
    params = {"city": _CITIES, "category": categories, "product": [p[1] for p in products],
              "customer": [c[1] for c in customers], "year": list(range(2018, 2025))}
    return ddl, data, params


def _build_school(rng: random.Random):
    ddl = [
        "CREATE TABLE students (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL,\n  city TEXT NOT NULL,\n"
        "  grade_level INTEGER NOT NULL\n)",
        "CREATE TABLE courses (\n  id INTEGER PRIMARY KEY,\n  title TEXT NOT NULL,\n  department TEXT NOT NULL,\n"
        "  credits INTEGER NOT NULL\n)",
        "CREATE TABLE grades (\n  student_id INTEGER NOT NULL REFERENCES students(id),\n"
        "  course_id INTEGER NOT NULL REFERENCES courses(id),\n  score INTEGER NOT NULL,\n"
        "  PRIMARY KEY (student_id, course_id)\n)",
    ]
    departments = ["math", "physics", "history", "biology", "art"]
    subjects = ["Algebra", "Geometry", "Mechanics", "Optics", "Ancient Rome", "Modern Europe", "Genetics", "Ecology",
                "Painting", "Sculpture", "Statistics", "Astronomy", "Botany", "Music Theory", "Calculus",
                "Thermodynamics", "World Wars", "Zoology", "Drawing", "Logic", "Cell Biology", "Electricity",
                "Medieval Art", "Number Theory", "Photography", "Climate", "Anatomy", "Renaissance", "Waves",
                "Probability"]
    students = [(i + 1, n, rng.choice(_CITIES), rng.randint(9, 12)) for i, n in enumerate(_people(rng, 200))]
    courses = [(i + 1, t, rng.choice(departments), rng.randint(1, 5)) for i, t in enumerate(subjects)]
    pairs = rng.sample([(s, c) for s in range(1, 201) for c in range(1, len(subjects) + 1)], 800)
    grades = [(s, c, rng.randint(40, 100)) for s, c in sorted(pairs)]
    data = {"students": students, "courses": courses, "grades": grades}
    params = {"city": _CITIES, "department": departments, "course": subjects,
              "student": [s[1] for s in students], "grade": [9, 10, 11, 12]}
    return ddl, data, params


def _build_library(rng: random.Random):
    ddl = [
        "CREATE TABLE books (\n  id INTEGER PRIMARY KEY,\n  title TEXT NOT NULL,\n  author TEXT NOT NULL,\n"
        "  genre TEXT NOT NULL,\n  year_published INTEGER NOT NULL,\n  pages INTEGER NOT NULL\n)",
        "CREATE TABLE members (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL,\n  city TEXT NOT NULL,\n"
        "  join_year INTEGER NOT NULL\n)",
        "CREATE TABLE loans (\n  id INTEGER PRIMARY KEY,\n  book_id INTEGER NOT NULL REFERENCES books(id),\n"
        "  member_id INTEGER NOT NULL REFERENCES members(id),\n  loan_year INTEGER NOT NULL,\n"
        "  returned INTEGER NOT NULL\n)",
    ]
    genres = ["mystery", "fantasy", "history", "poetry", "science", "romance"]
    authors = _people(rng, 40)
    pages = rng.sample(range(80, 1200), 200)  # distinct, so "the k longest books" has one right answer
    books = [(i + 1, t, rng.choice(authors), rng.choice(genres), rng.randint(1950, 2023), pages[i])
             for i, t in enumerate(_phrases(rng, 200))]
    members = [(i + 1, n, rng.choice(_CITIES), rng.randint(2010, 2024)) for i, n in enumerate(_people(rng, 120))]
    loans = [(i + 1, rng.randint(1, 200), rng.randint(1, 120), rng.randint(2015, 2024), int(rng.random() < 0.8))
             for i in range(600)]
    data = {"books": books, "members": members, "loans": loans}
    params = {"city": _CITIES, "genre": genres, "author": authors, "book": [b[1] for b in books],
              "year": list(range(2010, 2025))}
    return ddl, data, params


_BUILDERS = {"shop": _build_shop, "school": _build_school, "library": _build_library}

# Question templates: (name, draw) where draw(rng, params) -> (question, gold_sql). Names and values come from the
# generated data and contain no quotes, so plain string formatting is safe here.
_TEMPLATES = {
    "shop": [
        ("count_city", lambda r, p: (c := r.choice(p["city"]),
            f"How many customers live in {c}?",
            f"SELECT COUNT(*) FROM customers WHERE city = '{c}'")),
        ("filter_category_price", lambda r, p: (c := r.choice(p["category"]), x := r.choice(range(50, 451, 25)),
            f"List the names of {c} products that cost less than {x} dollars.",
            f"SELECT name FROM products WHERE category = '{c}' AND price < {x}")),
        ("top_expensive", lambda r, p: (k := r.randint(2, 10),
            f"What are the names of the {k} most expensive products?",
            f"SELECT name FROM products ORDER BY price DESC LIMIT {k}")),
        ("cheapest_in_category", lambda r, p: (c := r.choice(p["category"]),
            f"What is the name of the cheapest product in the {c} category?",
            f"SELECT name FROM products WHERE category = '{c}' ORDER BY price ASC LIMIT 1")),
        ("group_category_price", lambda r, p: (x := r.choice(range(50, 451, 25)),
            f"For each category, how many products cost more than {x} dollars?",
            f"SELECT category, COUNT(*) FROM products WHERE price > {x} GROUP BY category")),
        ("join_orders_city", lambda r, p: (c := r.choice(p["city"]), y := r.choice(p["year"]),
            f"How many orders were placed in {y} by customers from {c}?",
            "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
            f"WHERE customers.city = '{c}' AND orders.order_year = {y}")),
        ("join_customers_category", lambda r, p: (c := r.choice(p["category"]), y := r.choice(p["year"]),
            f"List the distinct names of customers who ordered a {c} product in {y}.",
            "SELECT DISTINCT customers.name FROM customers JOIN orders ON orders.customer_id = customers.id "
            f"JOIN products ON orders.product_id = products.id WHERE products.category = '{c}' "
            f"AND orders.order_year = {y}")),
        ("sum_quantity_product", lambda r, p: (n := r.choice(p["product"]),
            f"What is the total quantity ordered of the product '{n}'?",
            "SELECT SUM(orders.quantity) FROM orders JOIN products ON orders.product_id = products.id "
            f"WHERE products.name = '{n}'")),
        ("count_signup_range", lambda r, p: (a := r.randint(2015, 2022), b := r.randint(a + 1, 2024),
            f"How many customers signed up between {a} and {b} inclusive?",
            f"SELECT COUNT(*) FROM customers WHERE signup_year BETWEEN {a} AND {b}")),
        ("having_cities", lambda r, p: (n := r.randint(12, 24),
            f"Which cities have more than {n} customers?",
            f"SELECT city FROM customers GROUP BY city HAVING COUNT(*) > {n}")),
        ("count_orders_customer", lambda r, p: (n := r.choice(p["customer"]),
            f"How many orders has the customer {n} placed?",
            "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
            f"WHERE customers.name = '{n}'")),
    ],
    "school": [
        ("count_grade", lambda r, p: (g := r.choice(p["grade"]), c := r.choice(p["city"]),
            f"How many students from {c} are in grade {g}?",
            f"SELECT COUNT(*) FROM students WHERE city = '{c}' AND grade_level = {g}")),
        ("filter_courses", lambda r, p: (d := r.choice(p["department"]), c := r.randint(1, 4),
            f"List the titles of {d} courses worth at least {c} credits.",
            f"SELECT title FROM courses WHERE department = '{d}' AND credits >= {c}")),
        ("avg_score_course", lambda r, p: (t := r.choice(p["course"]),
            f"What is the average score in the course '{t}'?",
            "SELECT AVG(grades.score) FROM grades JOIN courses ON grades.course_id = courses.id "
            f"WHERE courses.title = '{t}'")),
        ("students_above", lambda r, p: (t := r.choice(p["course"]), s := r.choice(range(60, 96, 5)),
            f"List the names of students who scored above {s} in '{t}'.",
            "SELECT students.name FROM students JOIN grades ON grades.student_id = students.id "
            f"JOIN courses ON grades.course_id = courses.id WHERE courses.title = '{t}' AND grades.score > {s}")),
        ("group_department", lambda r, p: (c := r.randint(1, 4),
            f"For each department, how many courses are worth at least {c} credits?",
            f"SELECT department, COUNT(*) FROM courses WHERE credits >= {c} GROUP BY department")),
        ("max_score_course", lambda r, p: (t := r.choice(p["course"]),
            f"What is the highest score in '{t}'?",
            "SELECT MAX(grades.score) FROM grades JOIN courses ON grades.course_id = courses.id "
            f"WHERE courses.title = '{t}'")),
        ("count_courses_student", lambda r, p: (n := r.choice(p["student"]),
            f"How many courses has the student {n} taken?",
            "SELECT COUNT(*) FROM grades JOIN students ON grades.student_id = students.id "
            f"WHERE students.name = '{n}'")),
        ("having_avg_city", lambda r, p: (g := r.choice(p["grade"]), x := r.choice(range(66, 76)),
            f"Which cities have grade {g} students with an average score above {x}?",
            "SELECT students.city FROM students JOIN grades ON grades.student_id = students.id "
            f"WHERE students.grade_level = {g} GROUP BY students.city HAVING AVG(grades.score) > {x}")),
    ],
    "library": [
        ("count_genre_after", lambda r, p: (g := r.choice(p["genre"]), y := r.choice(range(1960, 2021, 5)),
            f"How many {g} books were published after {y}?",
            f"SELECT COUNT(*) FROM books WHERE genre = '{g}' AND year_published > {y}")),
        ("titles_by_author", lambda r, p: (a := r.choice(p["author"]),
            f"List the titles of books written by {a}.",
            f"SELECT title FROM books WHERE author = '{a}'")),
        ("unreturned_book", lambda r, p: (b := r.choice(p["book"]),
            f"How many loans of '{b}' have not been returned?",
            "SELECT COUNT(*) FROM loans JOIN books ON loans.book_id = books.id "
            f"WHERE books.title = '{b}' AND loans.returned = 0")),
        ("group_genre_before", lambda r, p: (y := r.choice(range(1970, 2021, 5)),
            f"For each genre, how many books were published before {y}?",
            f"SELECT genre, COUNT(*) FROM books WHERE year_published < {y} GROUP BY genre")),
        ("members_city_genre", lambda r, p: (c := r.choice(p["city"]), g := r.choice(p["genre"]),
            f"List the distinct names of members from {c} who borrowed a {g} book.",
            "SELECT DISTINCT members.name FROM members JOIN loans ON loans.member_id = members.id "
            f"JOIN books ON loans.book_id = books.id WHERE members.city = '{c}' AND books.genre = '{g}'")),
        ("longest_books", lambda r, p: (k := r.randint(2, 10),
            f"What are the titles of the {k} longest books?",
            f"SELECT title FROM books ORDER BY pages DESC LIMIT {k}")),
        ("earliest_genre", lambda r, p: (g := r.choice(p["genre"]),
            f"What is the earliest publication year of a {g} book?",
            f"SELECT MIN(year_published) FROM books WHERE genre = '{g}'")),
        ("having_authors", lambda r, p: (n := r.randint(3, 7),
            f"Which authors have written more than {n} books?",
            f"SELECT author FROM books GROUP BY author HAVING COUNT(*) > {n}")),
        ("members_joined", lambda r, p: (y := r.choice(p["year"]), c := r.choice(p["city"]),
            f"How many members from {c} joined in {y}?",
            f"SELECT COUNT(*) FROM members WHERE city = '{c}' AND join_year = {y}")),
    ],
}


def build_database(path: Path, db_id: str, seed: int) -> dict:
    """Write the database `db_id` for `seed` to `path` (atomically) unless it exists; return its template params."""
    ddl, data, params = _BUILDERS[db_id](random.Random(f"sql:{seed}:{db_id}"))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        conn = sqlite3.connect(tmp)
        try:
            for stmt in ddl:
                conn.execute(stmt)
            for table, rows in data.items():
                conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
            conn.commit()
        finally:
            conn.close()
        os.replace(tmp, path)  # readers never see a half-written file
    return params


class SqlTask:
    """Generated text-to-SQL. Splits: train / test from shop + school (disjoint questions), ood from library."""

    name = "sql"
    REASONS = REASONS

    def __init__(
        self,
        root=None,
        seed: int = 0,
        *,
        n_train: int = 400,
        n_test: int = 100,
        n_ood: int = 100,
        semantics: str = "set",
        timeout_s: float = 1.0,
        row_cap: int = 10_000,
    ):
        if semantics not in ("set", "bag"):
            raise ValueError(f"semantics must be 'set' or 'bag', got {semantics!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not (isinstance(row_cap, int) and row_cap >= 1):
            raise ValueError(f"row_cap must be an int >= 1, got {row_cap!r}")
        for arg, value in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
        if root is None:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            root = os.path.join(cache, "dph", "sql")
        self.root = Path(root) / f"v{_GENERATOR_VERSION}_seed{seed}"
        self.seed = seed
        self.semantics, self.timeout_s, self.row_cap = semantics, timeout_s, row_cap
        self.db_paths = {db: self.root / f"{db}.sqlite" for db in (*IN_DOMAIN_DBS, *OOD_DBS)}
        self._params = {db: build_database(path, db, seed) for db, path in self.db_paths.items()}
        self._schemas = {db: schema_text(path) for db, path in self.db_paths.items()}
        rng = random.Random(f"sql:{seed}:questions")
        in_domain = self._draw(rng, IN_DOMAIN_DBS, n_train + n_test)
        ood = self._draw(rng, OOD_DBS, n_ood)
        self._splits = {
            "train": [self._example("train", i, q) for i, q in enumerate(in_domain[:n_train])],
            "test": [self._example("test", i, q) for i, q in enumerate(in_domain[n_train:])],
            "ood": [self._example("ood", i, q) for i, q in enumerate(ood)],
        }

    def examples(self, split: str) -> list[Example]:
        return list(self._splits[check_split(split)])

    def score(self, example: Example, response: str) -> Score:
        meta = example.meta if isinstance(example.meta, dict) else {}
        return score_sql(
            response,
            str(example.answer),
            meta.get("db_path", ""),
            semantics=meta.get("semantics", self.semantics),
            timeout_s=self.timeout_s,
            row_cap=self.row_cap,
        )

    def _draw(self, rng: random.Random, dbs, n: int) -> list[tuple[str, str, str, str]]:
        """n distinct (db, template, question, gold) whose gold runs and returns a non-empty, non-NULL result."""
        templates = [(db, name, draw) for db in dbs for name, draw in _TEMPLATES[db]]
        seen: dict[str, tuple[str, str, str, str]] = {}
        misses = 0
        while len(seen) < n:
            db, name, draw = rng.choice(templates)
            *_, question, gold = draw(rng, self._params[db])
            if question in seen or not self._useful(db, gold):
                misses += 1
                if misses > 100 * n + 1000:  # many misses in a row: the templates are exhausted
                    raise ValueError(f"cannot draw {n} distinct questions from {dbs}; ask for fewer")
                continue
            misses = 0
            seen[question] = (db, name, question, gold)
        out = list(seen.values())
        rng.shuffle(out)  # mixes templates before the train / test cut
        return out

    def _useful(self, db: str, gold: str) -> bool:
        res = execute_readonly(self.db_paths[db], gold, timeout_s=5.0, row_cap=self.row_cap)
        return res.reason == "ok" and bool(res.rows) and any(v is not None for row in res.rows for v in row)

    def _example(self, split: str, i: int, q: tuple[str, str, str, str]) -> Example:
        db, template, question, gold = q
        return Example(
            id=f"sql-{split}-{i:05d}",
            prompt=sql_prompt(self._schemas[db], question),
            answer=gold,
            meta={"db_id": db, "db_path": str(self.db_paths[db]), "template": template, "semantics": self.semantics},
        )
