r"""PEFT's ``rank_pattern``/``alpha_pattern`` keys, matched without a backtracking regex engine.

PEFT picks a module's ``rank_pattern``/``alpha_pattern`` entry as the first key
(in file order) for which ``re.match(rf"(.*\.)?({key})$", module)`` succeeds:
a regex matching a dotted suffix of the module name. Handing a file's key to
Python's backtracking engine lets one key like ``"(a+)+$"`` run for hours, so
keys are parsed here into a small regex subset and matched by stepping an
automaton over the name (time linear in the name); anything outside the
subset is refused, naming the key. :func:`load_peft` builds one
``_PatternTable`` per config field.
"""

from __future__ import annotations

import collections
import heapq
import re
import warnings
from typing import Any, Callable

from .errors import CheckpointError

# PEFT picks a module's rank_pattern/alpha_pattern entry as the first key (in file order) for which
# re.match(rf"(.*\.)?({key})$", module) succeeds: a regex matching a dotted suffix of the module name.
# Handing a file's key to Python's backtracking engine lets one key like "(a+)+$" run for hours, so keys
# are parsed here into a small regex subset and matched by stepping an automaton over the name (time linear
# in the name); anything outside the subset is refused, naming the key.
_MAX_KEY_CHARS = 512
_MAX_KEYS = 65536  # per table; save_peft writes one key per module whose rank or alpha is not the common one
_MAX_REGEX_KEYS = 64  # per table, keys that need the automaton (plain or escaped names do not)
_MAX_STATES = 1024
_MAX_REPEAT = 100
_MAX_DEPTH = 32
_MATCH_BUDGET = 2_000_000  # steps of matching work one load may spend: well under a second
_NFA_STEP = 8  # steps one automaton state costs to visit: a step is about one string comparison (~0.1 µs)
# a key made only of plain characters, backslash-escaped punctuation and '.' (any character): what save_peft
# writes (re.escape'd names) and what PEFT users write (plain dotted names); no regex engine is needed
_FIXED = re.compile(r"(?:\\[^0-9A-Za-z]|[^\\^$*+?{}\[\]|()])*", re.DOTALL)
_ESCAPE = re.compile(r"\\.", re.DOTALL)
_BRACES = re.compile(r"\{([0-9]+)(?:(,)([0-9]*))?\}|\{,([0-9]+)\}")


class _Unsupported(Exception):
    """A pattern key outside the subset load_peft evaluates (internal; reported as a CheckpointError)."""


class _Parser:
    """Recursive descent over the regex subset: literals, ``\\``-escapes, ``.``, ``[...]``, ``\\d\\w\\s``,
    groups, ``|`` and repeats (``* + ? {m,n}``), with no repeat nested inside another.

    Nodes: ``("lit", ch)``, ``("any",)``, ``("cls", negated, items)``, ``("cat", nodes)``,
    ``("alt", nodes)``, ``("rep", node, lo, hi)`` (``hi=None``: unbounded).
    """

    def __init__(self, text: str):
        self.s, self.i, self.depth = text, 0, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def parse(self):
        node = self.alt()
        if self.i != len(self.s):
            raise _Unsupported(f"an unbalanced ')' at position {self.i}")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.repeat())
        return items[0] if len(items) == 1 else ("cat", items)

    def repeat(self):
        node = self.atom()
        bounds = self.quantifier()
        if bounds is None:
            return node
        lo, hi = bounds
        if self.peek() == "?":  # lazy: the same set of complete matches
            self.i += 1
        elif self.peek() == "+":
            raise _Unsupported("a possessive repeat")
        if (hi is None or hi > 1) and _repeats(node):
            # (a+)+ and the like: exponential time in PEFT's own (backtracking) matcher
            raise _Unsupported("a repeat nested inside another repeat")
        return ("rep", node, lo, hi)

    def quantifier(self):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        m = _BRACES.match(self.s, self.i)
        if m is None:
            return None  # Python reads such a '{' as a literal; atom() refuses it
        self.i = m.end()
        if m[4] is not None:
            lo, hi = 0, int(m[4])
        else:
            lo = int(m[1])
            hi = lo if m[2] is None else (int(m[3]) if m[3] else None)
        if lo > _MAX_REPEAT or (hi is not None and hi > _MAX_REPEAT):
            raise _Unsupported(f"a repeat count over {_MAX_REPEAT}")
        if hi is not None and hi < lo:
            raise _Unsupported("a repeat whose minimum exceeds its maximum")
        return lo, hi

    def atom(self):
        c = self.s[self.i]
        self.i += 1
        if c == "(":
            if self.peek() == "?":
                if self.s.startswith("?:", self.i):
                    self.i += 2
                elif self.s.startswith("?P<", self.i) and self.s.find(">", self.i) > 0:
                    end = self.s.find(">", self.i)
                    if not self.s[self.i + 3:end].isidentifier():
                        raise _Unsupported("a group name that is not an identifier")
                    self.i = end + 1
                else:
                    raise _Unsupported("a '(?' construct other than (?:...) and (?P<name>...)")
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise _Unsupported(f"groups nested more than {_MAX_DEPTH} deep")
            node = self.alt()
            if self.peek() != ")":
                raise _Unsupported("a '(' without its ')'")
            self.i += 1
            self.depth -= 1
            return node
        if c == "[":
            return self.charclass()
        if c == ".":
            return ("any",)
        if c == "\\":
            kind, x = self.escape()
            return ("cls", x.isupper(), [x.lower()]) if kind == "class" else ("lit", x)
        if c in "^$":
            raise _Unsupported(f"'{c}' other than '^' first or '$' last")
        if c in "*+?{":
            raise _Unsupported(f"a '{c}' that repeats nothing or is not a repeat count")
        return ("lit", c)

    def escape(self) -> tuple[str, str]:
        """``("class", letter)`` for ``\\d\\w\\s\\D\\W\\S``, else ``("lit", char)``."""
        if self.i >= len(self.s):
            raise _Unsupported("a trailing backslash")
        c = self.s[self.i]
        self.i += 1
        if c in "dwsDWS":
            return "class", c
        if c.isascii() and c.isalnum():
            raise _Unsupported(f"the escape '\\{c}'")
        return "lit", c

    def charclass(self):
        negated = self.peek() == "^"
        self.i += negated
        items, first = [], True
        while True:
            if self.i >= len(self.s):
                raise _Unsupported("a '[' without its ']'")
            c = self.s[self.i]
            self.i += 1
            if c == "]" and not first:
                return ("cls", negated, items)
            first = False
            if c == "\\":
                kind, c = self.escape()
                if kind == "class":
                    if c.isupper():
                        raise _Unsupported(f"'\\{c}' inside [...]")
                    items.append(c)
                    continue
            if self.peek() == "-" and self.i + 1 < len(self.s) and self.s[self.i + 1] != "]":
                self.i += 1
                hi = self.s[self.i]
                self.i += 1
                if hi == "\\":
                    kind, hi = self.escape()
                    if kind == "class":
                        raise _Unsupported("a range ending in a class escape")
                if hi < c:
                    raise _Unsupported(f"the reversed range '{c}-{hi}'")
                items.append((c, hi))
            else:
                items.append((c, c))


def _repeats(node) -> bool:
    """Whether a node contains a repeat of more than one."""
    if node[0] == "rep":
        return node[3] is None or node[3] > 1 or _repeats(node[1])
    if node[0] in ("cat", "alt"):
        return any(_repeats(n) for n in node[1])
    return False


def _char_ok(node, ch: str) -> bool:
    """Whether one character matches a ``lit``/``any``/``cls`` node, as Python's ``re`` does for ``str``."""
    if node[0] == "lit":
        return ch == node[1]
    if node[0] == "any":
        return ch != "\n"
    hit = False
    for item in node[2]:
        if item == "d":
            hit = ch.isdecimal()
        elif item == "w":
            hit = ch.isalnum() or ch == "_"
        elif item == "s":
            hit = ch.isspace()
        else:
            hit = item[0] <= ch <= item[1]
        if hit:
            break
    return hit != node[1]


class _Budget:
    """Work left for one load's pattern keys (parsing them, building and running automata, comparing names).

    Running out is a CheckpointError naming the config: together with the size limits this bounds the time
    a config can take, however its keys are written.
    """

    def __init__(self, where: str, steps: int | None = None):
        self.where, self.left = where, _MATCH_BUDGET if steps is None else steps

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise CheckpointError(f"'{self.where}': evaluating rank_pattern/alpha_pattern/target_modules for "
                                  f"these module names takes more than {_MATCH_BUDGET} steps; simplify those keys")


class _Automaton:
    """A Thompson NFA of a parsed key, run as a lazily built DFA: time linear in the name."""

    def __init__(self, node, budget: _Budget):
        self.edges: list[list] = [[]]
        self.eps: list[list[int]] = [[]]
        self.accept = self._build(node, 0)
        # work of one step out of each state (a class costs one unit per item), charged before it is done
        self.cost = [_NFA_STEP * (1 + sum(1 + (len(n[2]) if n[0] == "cls" else 0) for n, _ in e)) for e in self.edges]
        budget.spend(sum(self.cost))
        # ε-closures are found when first needed (all of them up front can be quadratic in the states), and
        # state sets are interned so the cache's keys compare by identity, not element by element
        self.closures: list[frozenset | None] = [None] * len(self.edges)
        self.sets: dict[frozenset, frozenset] = {}
        self.cache: dict = {}

    def _intern(self, states: frozenset) -> frozenset:
        return self.sets.setdefault(states, states) if len(self.sets) < 65536 else states

    def _new(self) -> int:
        if len(self.edges) >= _MAX_STATES:
            raise _Unsupported(f"more than {_MAX_STATES} automaton states (too complex)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _build(self, node, s: int) -> int:
        """Add ``node`` starting at state ``s``; returns its end state."""
        kind = node[0]
        if kind in ("lit", "any", "cls"):
            t = self._new()
            self.edges[s].append((node, t))
            return t
        if kind == "cat":
            for n in node[1]:
                s = self._build(n, s)
            return s
        if kind == "alt":
            end = self._new()
            for branch in node[1]:
                start = self._new()
                self.eps[s].append(start)
                self.eps[self._build(branch, start)].append(end)
            return end
        _, body, lo, hi = node
        for _ in range(lo):
            s = self._build(body, s)
        if hi is None:  # a fresh state is both the loop's entry and its exit
            loop = self._new()
            self.eps[s].append(loop)
            self.eps[self._build(body, loop)].append(loop)
            return loop
        for _ in range(hi - lo):
            end = self._new()
            self.eps[s].append(end)
            self.eps[self._build(body, s)].append(end)
            s = end
        return s

    def _closure(self, s: int, budget: _Budget) -> frozenset:
        if self.closures[s] is None:
            seen, todo = {s}, [s]
            while todo:
                for t in self.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            budget.spend(_NFA_STEP * len(seen))
            self.closures[s] = self._intern(frozenset(seen))
        return self.closures[s]

    def fullmatch(self, name: str, budget: _Budget) -> bool:
        cur = self._closure(0, budget)
        for ch in name:
            nxt = self.cache.get((cur, ch))
            if nxt is None:
                budget.spend(sum(self.cost[s] for s in cur))
                acc: set = set()
                for s in cur:
                    for node, t in self.edges[s]:
                        if _char_ok(node, ch):
                            acc |= self._closure(t, budget)
                budget.spend(_NFA_STEP * len(acc))
                nxt = self._intern(frozenset(acc))
                if len(self.cache) < 65536:
                    self.cache[(cur, ch)] = nxt
            else:
                budget.spend(1)
            if not nxt:
                return False
            cur = nxt
        return self.accept in cur


# (.*\.)? in front of a key: PEFT's "any dotted prefix"
_PREFIX = ("rep", ("cat", [("rep", ("any",), 0, None), ("lit", ".")]), 0, 1)


class _Key:
    """One pattern key, ready to match a whole module name (``whole``) or, as PEFT does for rank/alpha
    patterns, a dotted suffix of it.

    ``literal``: the name a plain or ``re.escape``'d key stands for; ``fixed``: ``(length, literal runs with
    their offsets, offsets of '.')`` for keys of literals and '.' (any character but a newline); else an
    automaton.
    """

    def __init__(self, key: str, suffix: bool, budget: _Budget | None = None):
        if len(key) > _MAX_KEY_CHARS:
            raise _Unsupported(f"more than {_MAX_KEY_CHARS} characters")
        body = key[1:] if key.startswith("^") else key
        if body.endswith("$") and (len(body) - 1 - len(body[:-1].rstrip("\\"))) % 2 == 0:
            body = body[:-1]  # an unescaped trailing '$' (an even number of backslashes before it): redundant
        self.whole = key.startswith("^") or not suffix
        self.literal = self.fixed = self.nfa = None
        budget = budget or _Budget("")
        if _FIXED.fullmatch(body) and "." not in _ESCAPE.sub("", body):
            # plain or re.escape'd: str-level work only, so big save_peft tables stay cheap
            budget.spend(1 + len(body) // 4)
            # every backslash escapes the character after it: drop the lone ones, keep one of each pair
            self.literal = "\\".join(part.replace("\\", "") for part in body.split("\\\\"))
            return
        budget.spend(1 + len(body))  # parsing, a Python step per character
        if _FIXED.fullmatch(body):
            # the runs of literal characters between the '.' wildcards, each compared in one str call
            runs: list[tuple[int, str]] = []
            wild: list[int] = []
            i = size = 0
            while i < len(body):
                if body[i] == ".":
                    wild.append(size)
                else:
                    ch = body[i + 1] if body[i] == "\\" else body[i]
                    i += body[i] == "\\"
                    if runs and runs[-1][0] + len(runs[-1][1]) == size:
                        runs[-1] = (runs[-1][0], runs[-1][1] + ch)
                    else:
                        runs.append((size, ch))
                i += 1
                size += 1
            self.fixed = (size, runs, wild)
            return
        node = _Parser(body).parse()
        self.nfa = _Automaton(node if self.whole else ("cat", [_PREFIX, node]), budget)

    def matches(self, name: str, budget: _Budget) -> bool:
        if self.literal is not None:
            return name == self.literal or (not self.whole and name.endswith("." + self.literal))
        if self.fixed is not None:
            size, runs, wild = self.fixed
            start = len(name) - size  # a fixed-length key can only be the name's last characters
            if start < 0 or (start > 0 and (self.whole or name[start - 1] != ".")):
                budget.spend(1)
                return False
            compared = 1
            for offset, run in runs:
                compared += 1
                if not name.startswith(run, start + offset):
                    budget.spend(compared)
                    return False
            budget.spend(compared)
            return "\n" not in name or all(name[start + k] != "\n" for k in wild)  # '.' is not a newline
        return self.nfa.fullmatch(name, budget)


def _compile_key(key: str, suffix: bool, what: str, where: str, budget: _Budget) -> _Key:
    try:
        return _Key(key, suffix, budget)
    except _Unsupported as err:
        reason = f"uses {err}, which load_peft does not evaluate"
        if len(key) <= _MAX_KEY_CHARS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    re.compile(key)
            except (re.error, OverflowError, RecursionError, ValueError) as bad:
                reason = f"is not a valid regular expression ({bad})"
        shown = repr(key) if len(key) <= 100 else f"{key[:60]!r}... ({len(key)} characters)"
        raise CheckpointError(f"'{where}': {what} key {shown} {reason}. Keys may be module names (plain or "
                              "re.escape'd) or regexes of literals, '.', [...], \\d \\w \\s, groups, '|' and "
                              "repeats that are not nested, with '^' only first and '$' only last") from None


def _suffixes(name: str):
    """The name and each part of it after a dot: the names a literal key can stand for."""
    yield name
    i = name.find(".")
    while i >= 0:
        yield name[i + 1:]
        i = name.find(".", i + 1)


class _PatternTable:
    """A ``rank_pattern``/``alpha_pattern`` field, every key and value checked when the config is read.

    Lookups stay cheap for big tables: literal keys (what save_peft writes, one per module) are found
    through the name's dotted suffixes, and keys of literals and '.' only where their length fits one of those
    suffixes, so only keys that can match are tried, in file order (the first match wins, as in PEFT).
    """

    def __init__(self, field: str, table: Any, check: Callable[[Any, str], Any], where: str, budget: _Budget):
        if table is None:
            table = {}
        if not isinstance(table, dict):
            raise CheckpointError(f"'{where}': field '{field}' is a {type(table).__name__}, not an object "
                                  "of module name → value")
        if len(table) > _MAX_KEYS:
            raise CheckpointError(f"'{where}': field '{field}' has {len(table)} keys (at most {_MAX_KEYS})")
        self.suffix_literals: dict[str, tuple[int, Any]] = {}
        self.whole_literals: dict[str, tuple[int, Any]] = {}
        self.by_length: dict[int, list[tuple[int, _Key, Any]]] = collections.defaultdict(list)
        self.regexes: list[tuple[int, _Key, Any]] = []
        for i, (key, value) in enumerate(table.items()):
            k = _compile_key(key, True, field, where, budget)
            value = check(value, f"{field}[{key!r}]")
            if k.literal is not None:
                (self.whole_literals if k.whole else self.suffix_literals).setdefault(k.literal, (i, value))
            elif k.fixed is not None:
                self.by_length[k.fixed[0]].append((i, k, value))
            else:
                self.regexes.append((i, k, value))
                if len(self.regexes) > _MAX_REGEX_KEYS:
                    raise CheckpointError(f"'{where}': field '{field}' has more than {_MAX_REGEX_KEYS} regex keys "
                                          "(names, plain or escaped, are not counted)")

    def value(self, name: str, default: Any, budget: _Budget) -> Any:
        suffixes = list(_suffixes(name))
        hits = [self.whole_literals[name]] if name in self.whole_literals else []
        hits += [self.suffix_literals[s] for s in suffixes if s in self.suffix_literals]
        first = min(hits, key=lambda h: h[0]) if hits else None
        lists = [self.by_length[n] for n in {len(s) for s in suffixes} if n in self.by_length] + [self.regexes]
        for i, key, v in heapq.merge(*lists, key=lambda entry: entry[0]):  # each list is in file order
            if first is not None and i > first[0]:
                break
            budget.spend(2)  # the loop's own work, a couple of string comparisons' worth
            if key.matches(name, budget):
                first = (i, v)
                break
        return default if first is None else first[1]
