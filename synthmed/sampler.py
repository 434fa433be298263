"""DatasetSpec -> cases. The only place in synthmed where randomness is drawn.

Case ``i`` owns ``numpy.random.SeedSequence(spec.seed, spawn_key=(i,))``: its image seed is
the first 64 bits of that sequence's state with the top bit cleared (so it fits a signed
64-bit integer everywhere), and under ``allocation: random`` its labels come
from the following words. Under ``allocation: exact`` the counts per finding x location x
severity cell are fixed by largest-remainder rounding, then balanced so that each mixture entry's
total is within one case of its share too (:func:`balance_groups`) and, inside each entry, each
finding's totals per location and severity as well where a move can do it (:func:`balance_attributes`),
splits, sexes and views are rounded
within each cell (so every cell and every total is within one case of its target), ages are
stratified over the distribution's quantiles, and one spec-level permutation spreads the
cells over the case indices.

Example:
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 4\\nseed: 1\\nfindings: [{finding: cardiomegaly, weight: 1}]")
    >>> cases = sample_cases(spec)
    >>> len(cases), cases[0].case_id, cases[0].findings[0].finding
    (4, 'case-0000000', 'cardiomegaly')
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from .cells import Cell, FindingLabel, enumerate_cells
from .vocabulary import CHEXPERT_COLUMNS, Vocabulary, get_vocabulary

# Bumped whenever the same spec gives other cases; a run started under another version is not resumed.
# 2: exact allocation also keeps each entry's location and severity totals within one (balance_attributes).
# 3: remainders are compared to REMAINDER_DIGITS decimals (float noise ties; ties go to the earlier cell).
SAMPLER_VERSION = 3
# Remainders are compared rounded to this many decimals: closer ones tie (float noise, not a real difference).
REMAINDER_DIGITS = 9
# An entry with more cells than this (four findings at every lobe and severity) keeps its largest-remainder counts.
MAX_BALANCED_CELLS = 20_000

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .spec import DatasetSpec

CASE_ID_WIDTH = 7  # count <= 10,000,000, so ids never change width when count grows
# spawn keys of the spec-level draws: two words long, so they can never equal a case's (i,)
_PERMUTATION_KEY = (2**32 - 1, 1)
_AGE_KEY = (2**32 - 1, 2)
_LABEL_WORDS = 2 + 2 * 6  # seed (2 words) + 6 uniforms of 2 words: cell, split, sex, view, age, spare


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class Case:
    """Everything an image will show, and the seed it is drawn with. JSON-serialisable."""

    case_id: str
    index: int
    split: str | None
    seed: int | None
    findings: tuple[FindingLabel, ...]
    sex: str | None = None
    age: int | None = None
    view: str | None = None

    def chexpert_labels(self, vocab: Vocabulary | None = None) -> dict[str, int]:
        """The 14 CheXpert columns as 1/0, as the CheXpert labeler sets them.

        A column is 1 when a finding of the case maps to it. No Finding is 1 when no finding maps to a column
        other than No Finding and Support Devices: support devices alone leave it 1.

        Example:
            >>> Case("c", 0, None, None, (FindingLabel("endotracheal_tube"),)).chexpert_labels()["No Finding"]
            1
        """
        vocab = vocab or get_vocabulary()
        present = {vocab.findings[f.finding].chexpert for f in self.findings}
        labels = {col: int(col in present) for col in CHEXPERT_COLUMNS}
        labels["No Finding"] = int(not present - {"No Finding", "Support Devices"})
        return labels

    def to_dict(self, vocab: Vocabulary | None = None) -> dict:
        return {"case_id": self.case_id, "index": self.index, "split": self.split, "seed": self.seed,
                "findings": [f.to_dict(vocab) for f in self.findings],
                "patient": {"sex": self.sex, "age": self.age}, "view": self.view}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        patient = d.get("patient") or {}
        return cls(case_id=d["case_id"], index=int(d.get("index", -1)), split=d.get("split"), seed=d.get("seed"),
                   findings=tuple(FindingLabel(f["finding"], f.get("location"), f.get("severity"))
                                  for f in d["findings"]),
                   sex=patient.get("sex"), age=patient.get("age"), view=d.get("view"))


def case_id_for(index: int) -> str:
    return f"case-{index:0{CASE_ID_WIDTH}d}"


# ----------------------------------------------------------------------------- rounding

def largest_remainder(total: int, probs: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total``, each the floor or ceiling of ``total * p``.

    Leftover units go to the largest remainders; ties to the earlier choice. Remainders are compared
    rounded to ``REMAINDER_DIGITS`` decimals: equal weights normalised in another order differ in the
    last bits, and that must not decide which of them gets the spare case.

    Example:
        >>> largest_remainder(10, [0.5, 0.3, 0.2])
        [5, 3, 2]
        >>> largest_remainder(3, [1/3, 1/3, 1/3])
        [1, 1, 1]
        >>> largest_remainder(24, [0.1 / 9.4, 4.4 / 9.4, 4.8 / 9.4, 0.1 / 9.4])  # .2553 thrice: the first
        [1, 11, 12, 0]
    """
    targets = [total * p for p in probs]
    counts = [int(t) for t in targets]
    left = total - sum(counts)
    order = sorted(range(len(probs)), key=lambda j: (-_remainder(targets[j]), j))
    for j in order[:left]:
        counts[j] += 1
    return counts


def _remainder(target: float) -> float:
    """``target``'s fractional part, rounded so that remainders within float noise of each other tie."""
    return round(target - math.floor(target), REMAINDER_DIGITS)


def balance_groups(counts: Sequence[int], targets: Sequence[float], groups: Sequence[int]) -> list[int]:
    """Move units between counts until every group's total is within one of its target.

    ``counts`` are floors or ceilings of ``targets`` (from :func:`largest_remainder`), whose
    leftover units go to the largest remainders over *all* items: a group of many small items
    (an entry spread over locations x severities) can lose every unit to other groups' items.
    Each move takes a unit from a rounded-up item of the group most over its target to the
    rounded-down item with the largest remainder of the group most under it, so every count
    stays a floor or ceiling. Counts that already meet this are returned unchanged.

    Example:
        >>> balance_groups([1, 1, 0, 0, 0], [0.6, 0.6, 0.6, 0.6, 0.6], [0, 0, 1, 1, 1])
        [1, 0, 1, 0, 0]
    """
    counts = list(counts)
    n_groups = max(groups, default=-1) + 1
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for j, g in enumerate(groups):
        members[g].append(j)
    miss = [sum(counts[j] for j in m) - sum(targets[j] for j in m) for m in members]
    for _ in range(len(counts) + 1):  # each move fixes one unit of a miss >= 1 and opens none
        worst = max(range(n_groups), key=lambda g: (abs(miss[g]), -g), default=None)
        if worst is None or abs(miss[worst]) < 1 - 1e-9:
            break
        over = worst if miss[worst] > 0 else max(range(n_groups), key=lambda g: (miss[g], -g))
        under = worst if miss[worst] < 0 else min(range(n_groups), key=lambda g: (miss[g], g))
        # rounded up in `over` with the smallest remainder; rounded down in `under` with the largest
        give = min((j for j in members[over] if counts[j] > targets[j] + 1e-12),
                   key=lambda j: (_remainder(targets[j]), -j))
        take = max((j for j in members[under] if counts[j] < targets[j] - 1e-12),
                   key=lambda j: (_remainder(targets[j]), -j))
        counts[give] -= 1
        counts[take] += 1
        miss[over] -= 1
        miss[under] += 1
    return counts


def balance_attributes(counts: Sequence[int], targets: Sequence[float], groups: Sequence[int],
                       keys: Sequence[Sequence]) -> list[int]:
    """Move units between items of one group until no attribute's total is a whole unit off, where a move can fix it.

    Items are cells; ``keys`` are each cell's attributes (an entry's finding at a location, at a
    severity). Largest remainder breaks ties and near-ties by position, so an entry spread evenly over
    right and left can get every leftover case on the right. Each move takes a unit from a rounded-up
    cell to a rounded-down cell of the same group (every count stays a floor or ceiling, every group
    total is unchanged) and must lower the sum of squared attribute errors, so the loop ends. Counts
    whose attribute totals are already within one are returned unchanged. Every sum runs in a fixed
    order (bincount, integer products), so the result does not depend on the CPU's maths library. A
    group of more than ``MAX_BALANCED_CELLS`` cells is left as it is.

    Example:
        >>> balance_attributes([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0],
        ...                    [("right", "mild"), ("right", "severe"), ("left", "mild"), ("left", "severe")])
        [0, 1, 1, 0]
    """
    import numpy as np

    counts = np.array(counts, dtype=np.int64)
    targets_arr = np.asarray(targets, dtype=np.float64)
    members: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        members.setdefault(g, []).append(j)
    for idx in members.values():
        names = list(dict.fromkeys(k for j in idx for k in keys[j]))
        if len(idx) < 2 or not names or len(idx) > MAX_BALANCED_CELLS:
            continue
        column = {k: i for i, k in enumerate(names)}
        pairs = [(row, column[k]) for row, j in enumerate(idx) for k in keys[j]]
        rows = np.array([r for r, _ in pairs], dtype=np.int64)
        cols = np.array([c for _, c in pairs], dtype=np.int64)
        incidence = np.zeros((len(idx), len(names)), dtype=np.int32)
        incidence[rows, cols] = 1
        c, t = counts[idx], targets_arr[idx]
        for _ in range(2 * len(idx) + 10):
            diff = c - t
            error = np.bincount(cols, weights=diff[rows], minlength=len(names))
            if np.all(np.abs(error) < 1 - 1e-9):
                break
            up, down = np.flatnonzero(diff > 1e-9), np.flatnonzero(diff < -1e-9)
            if not up.size or not down.size:
                break
            # change of sum(error**2) when x gives a unit to y: attributes of x only lose one, of y only gain one.
            # The givers that lower it most are tried against every taker (all pairs would be cells**2 per move);
            # scores are rounded so that exact ties go to the first cell, not to the last bit of a sum.
            give = np.round(np.bincount(rows, weights=(1 - 2 * error)[cols], minlength=len(idx)), 9)
            take = np.round(np.bincount(rows, weights=(1 + 2 * error)[cols], minlength=len(idx)), 9)[down]
            takers = incidence[down]
            best, move = -1e-6, None
            for x in up[np.argsort(give[up], kind="stable")[:8]]:
                change = give[x] + take - 2 * (takers @ incidence[x])
                y = int(np.argmin(change))
                if change[y] < best:
                    best, move = change[y], (x, down[y])
            if move is None:
                break
            c[move[0]] -= 1
            c[move[1]] += 1
        counts[idx] = c
    return counts.tolist()


def controlled_rounding(group_totals: Sequence[int], probs: Sequence[float]) -> list[list[int]]:
    """Split each group's total over the choices so that every count and every choice's total stays within one.

    Each count is the floor or ceiling of ``total * p``; each choice's total over all groups
    is within one of ``sum(group_totals) * p``. The leftover units first go by the running
    deficit of each choice (error diffusion); where that leaves a choice's total a whole
    case off, units are moved along a path of groups, each move keeping its counts at the
    floor or ceiling (a controlled rounding of the groups x choices table).

    Example:
        >>> controlled_rounding([1, 1, 1, 1], [0.5, 0.5])
        [[1, 0], [0, 1], [1, 0], [0, 1]]
    """
    import numpy as np

    k = len(probs)
    deficit = [0.0] * k
    result: list[list[int]] = []
    for total in group_totals:
        targets = [total * p for p in probs]
        counts = [int(t) for t in targets]
        left = total - sum(counts)
        if left:
            score = [deficit[j] + targets[j] - counts[j] for j in range(k)]
            candidates = [j for j in range(k) if targets[j] - counts[j] > 1e-12] or list(range(k))
            for j in sorted(candidates, key=lambda j: (-score[j], j))[:left]:
                counts[j] += 1
        for j in range(k):
            deficit[j] += targets[j] - counts[j]
        result.append(counts)
    if k < 3 or not result:
        return result  # with two choices error diffusion already keeps the totals within one
    counts_arr = np.array(result, dtype=np.int64)
    targets_arr = np.array(group_totals, dtype=np.float64)[:, None] * np.array(probs, dtype=np.float64)[None, :]
    for _ in range(4 * k * len(group_totals) + 10):
        excess = counts_arr.sum(axis=0) - targets_arr.sum(axis=0)
        if np.all(np.abs(excess) < 1 - 1e-9):
            break
        source = int(np.argmax(excess)) if excess.max() >= 1 - 1e-9 else None
        sinks = [j for j in np.argsort(excess) if excess[j] < 0] if source is not None else \
            [int(np.argmin(excess))]
        if source is None:  # a choice is a whole case short: feed it from the most over-served one
            source = int(np.argmax(excess))
        path = _move_path(counts_arr, targets_arr, source, set(int(j) for j in sinks))
        if path is None:
            break
        for group, a, b in path:
            counts_arr[group, a] -= 1
            counts_arr[group, b] += 1
    return counts_arr.tolist()


def _move_path(counts, targets, source: int, sinks: set) -> list[tuple[int, int, int]] | None:
    """Breadth-first search over choices for moves (group, from, to) carrying one unit from source to a sink."""
    diff = counts - targets
    can_give = diff > 1e-9    # rounded up: may go down to the floor
    can_take = diff < -1e-9   # rounded down: may go up to the ceiling
    k = counts.shape[1]
    previous: dict[int, tuple[int, int]] = {source: (-1, -1)}
    frontier = [source]
    while frontier:
        nxt = []
        for a in frontier:
            for b in range(k):
                if b in previous:
                    continue
                groups = (can_give[:, a] & can_take[:, b]).nonzero()[0]
                if groups.size:
                    previous[b] = (a, int(groups[0]))
                    if b in sinks:
                        path, node = [], b
                        while node != source:
                            a_, g = previous[node]
                            path.append((g, a_, node))
                            node = a_
                        return path[::-1]
                    nxt.append(b)
        frontier = nxt
    return None


# ----------------------------------------------------------------------------- seeds

_MASK = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715


def _uint32_words(n: int) -> list[int]:
    words = []
    while True:
        words.append(n & _MASK)
        n >>= 32
        if not n:
            return words


def seed_sequence_state(entropy: int, indices: "np.ndarray", n_words: int) -> "np.ndarray":
    """``SeedSequence(entropy, spawn_key=(i,)).generate_state(n_words)`` for many ``i`` at once.

    A vectorised transcription of numpy's SeedSequence (O'Neill's seed_seq_fe, pool size 4);
    tests check it word for word against ``numpy.random.SeedSequence``.

    Returns:
        uint32 array of shape (len(indices), n_words).
    """
    import numpy as np

    idx = np.asarray(indices, dtype=np.uint64)
    if idx.size and int(idx.max()) > _MASK:
        raise ValueError("case indices must be below 2**32")
    run = _uint32_words(int(entropy))
    run += [0] * (4 - len(run)) if len(run) < 4 else []
    entropy_words: list = list(run) + [idx]  # spawn key (i,) is one word for i < 2**32
    hc = [_INIT_A]

    def hashmix(value):
        value = np.bitwise_xor(value, np.uint64(hc[0]))
        hc[0] = (hc[0] * _MULT_A) & _MASK
        value = (value * np.uint64(hc[0])) & np.uint64(_MASK)
        return value ^ (value >> np.uint64(16))

    def mix(x, y):
        r = (np.uint64(_MIX_MULT_L) * x - np.uint64(_MIX_MULT_R) * y) & np.uint64(_MASK)
        return r ^ (r >> np.uint64(16))

    as_array = lambda w: w if isinstance(w, np.ndarray) else np.full(idx.shape, w, dtype=np.uint64)  # noqa: E731
    pool = [hashmix(as_array(entropy_words[i])) for i in range(4)]
    for i_src in range(4):
        for i_dst in range(4):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    for i_src in range(4, len(entropy_words)):
        for i_dst in range(4):
            pool[i_dst] = mix(pool[i_dst], hashmix(as_array(entropy_words[i_src])))
    out = np.empty((idx.size, n_words), dtype=np.uint32)
    hash_const = _INIT_B
    for i_dst in range(n_words):
        data = pool[i_dst % 4] ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_B) & _MASK
        data = (data * np.uint64(hash_const)) & np.uint64(_MASK)
        out[:, i_dst] = data ^ (data >> np.uint64(16))
    return out


def _uniforms(words: "np.ndarray", k: int) -> "np.ndarray":
    """The k-th 53-bit uniform in [0, 1) from a case's state words (numpy's two-word recipe)."""
    import numpy as np

    a = words[:, 2 + 2 * k].astype(np.uint64) >> np.uint64(5)
    b = words[:, 3 + 2 * k].astype(np.uint64) >> np.uint64(6)
    return (a.astype(np.float64) * 67108864.0 + b.astype(np.float64)) / 9007199254740992.0


def _spec_rng(seed: int, key: tuple):
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ----------------------------------------------------------------------------- ages

def age_from_uniform(age, u: "np.ndarray") -> "np.ndarray":
    """Whole-year ages from uniforms in [0, 1) by the inverse CDF of the age distribution."""
    import numpy as np

    if age.distribution == "fixed":
        return np.full(u.shape, age.value, dtype=np.int16)
    if age.distribution == "uniform":
        return np.minimum(age.min + np.floor(u * (age.max - age.min + 1)), age.max).astype(np.int16)
    if age.distribution == "categorical":
        cum = np.cumsum([p for *_, p in age.bins])
        which = np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(age.bins) - 1)
        lo = np.array([b[0] for b in age.bins])[which]
        hi = np.array([b[1] for b in age.bins])[which]
        # position inside the chosen bin, reusing u's rank within it
        lower = np.concatenate([[0.0], cum / cum[-1]])[which]
        upper = (cum / cum[-1])[which]
        within = np.clip((u - lower) / np.maximum(upper - lower, 1e-300), 0, 1 - 1e-12)
        return (lo + np.floor(within * (hi - lo + 1))).astype(np.int16)
    from scipy.special import ndtr, ndtri

    # truncated normal on [min, max + 1), floored: every whole year in [min, max] is reachable
    a = ndtr((age.min - age.mean) / age.sd)
    b = ndtr((age.max + 1 - age.mean) / age.sd)
    x = age.mean + age.sd * ndtri(a + u * (b - a))
    return np.clip(np.floor(x), age.min, age.max).astype(np.int16)


# ----------------------------------------------------------------------------- the case list

class CaseList(Sequence[Case]):
    """The cases of a spec, stored as columns; indexing yields frozen :class:`Case` records.

    Holds a million cases in a few tens of MB. ``to_frame()`` gives a pandas DataFrame.
    """

    def __init__(self, spec: "DatasetSpec", cells: list[Cell], cell: "np.ndarray", split: "np.ndarray",
                 sex: "np.ndarray", view: "np.ndarray", age: "np.ndarray", seed: "np.ndarray", start: int = 0):
        self.spec = spec
        self.cells = cells
        self.split_names = spec.splits.keys
        self.sex_names = spec.sex.keys
        self.view_names = spec.view.keys
        self._cell, self._split, self._sex, self._view, self._age, self._seed = cell, split, sex, view, age, seed
        self.start = start

    def __len__(self) -> int:
        return int(self._cell.shape[0])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"cases are indexed by position (0..{len(self) - 1}) or a slice, not "
                            f"{type(i).__name__}; find a case id with next(c for c in cases if c.case_id == ...)")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"case {i} out of range (0..{len(self) - 1})")
        index = self.start + i
        return Case(case_id=case_id_for(index), index=index, split=self.split_names[self._split[i]],
                    seed=int(self._seed[i]), findings=self.cells[self._cell[i]].findings,
                    sex=self.sex_names[self._sex[i]], age=int(self._age[i]), view=self.view_names[self._view[i]])

    def __iter__(self) -> Iterator[Case]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"<CaseList {self.spec.name}: {len(self)} cases, {len(self.cells)} cells>"

    def columns(self) -> dict:
        """Raw columns (numpy arrays of indices into cells / names) for fast summaries."""
        return {"cell": self._cell, "split": self._split, "sex": self._sex, "view": self._view,
                "age": self._age, "seed": self._seed}

    def counts(self) -> list[dict]:
        """Rows of (finding, location, severity) with the number of cases per split, in cell order."""
        import numpy as np

        table = np.zeros((len(self.cells), len(self.split_names)), dtype=np.int64)
        np.add.at(table, (self._cell, self._split), 1)
        rows = []
        for c, cell in enumerate(self.cells):
            row = {"finding": cell.finding, "location": cell.location, "severity": cell.severity,
                   "target": cell.prob * self.spec.count}
            row.update({s: int(table[c, j]) for j, s in enumerate(self.split_names)})
            row["total"] = int(table[c].sum())
            rows.append(row)
        return rows

    def iter_jsonl(self) -> Iterator[str]:
        """One JSON line per case (the cases.jsonl format), built fast from per-cell fragments."""
        vocab = get_vocabulary()
        fragments = [json.dumps([f.to_dict(vocab) for f in cell.findings], ensure_ascii=False) for cell in self.cells]
        splits = [json.dumps(s) for s in self.split_names]
        sexes = [json.dumps(s) for s in self.sex_names]
        views = [json.dumps(s) for s in self.view_names]
        cell, split, sex, view, age, seed = (a.tolist() for a in (self._cell, self._split, self._sex, self._view,
                                                                  self._age, self._seed))
        for i in range(len(self)):
            index = self.start + i
            yield (f'{{"case_id": "{case_id_for(index)}", "index": {index}, "split": {splits[split[i]]}, '
                   f'"seed": {seed[i]}, "findings": {fragments[cell[i]]}, '
                   f'"patient": {{"sex": {sexes[sex[i]]}, "age": {age[i]}}}, "view": {views[view[i]]}}}')

    def write_jsonl(self, path) -> None:
        """Write cases.jsonl (atomically: a temp file in the same folder, then a rename)."""
        from pathlib import Path

        from .atomic import atomic_write_text_lines

        atomic_write_text_lines(Path(path), self.iter_jsonl())

    def to_frame(self):
        """A pandas DataFrame, one row per case, with the CheXpert columns (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("CaseList.to_frame() needs pandas: pip install 'synthmed[frame]'") from None
        vocab = get_vocabulary()
        cell_rows = []
        for cell in self.cells:
            present = {vocab.findings[f.finding].chexpert for f in cell.findings}
            cell_rows.append({"finding": cell.finding, "location": cell.location, "severity": cell.severity,
                              **{c: int(c in present) for c in CHEXPERT_COLUMNS}})
        cells = pd.DataFrame(cell_rows)
        frame = cells.iloc[self._cell].reset_index(drop=True)
        frame.insert(0, "case_id", [case_id_for(self.start + i) for i in range(len(self))])
        frame.insert(1, "split", pd.Categorical.from_codes(self._split, list(self.split_names)))
        frame.insert(2, "seed", self._seed)
        frame["sex"] = pd.Categorical.from_codes(self._sex, list(self.sex_names))
        frame["age"] = self._age
        frame["view"] = pd.Categorical.from_codes(self._view, list(self.view_names))
        return frame


def sample_cases(spec: "DatasetSpec", *, limit: int | None = None) -> CaseList:
    """Draw the cases of a spec: deterministic for a spec, whatever machine or process.

    Args:
        spec: a loaded :class:`~synthmed.spec.DatasetSpec` (or what :func:`~synthmed.spec.load_spec` takes).
        limit: return only the first ``limit`` cases (the same cases a full run starts with).

    Example:
        >>> from synthmed import load_spec, sample_cases
        >>> cases = sample_cases(load_spec("dataset_specs/pneumonia.yaml"))  # doctest: +SKIP
        >>> cases[0].findings  # doctest: +SKIP
    """
    import numpy as np

    from .spec import DatasetSpec, load_spec

    if isinstance(spec, (str, bytes, Path, Mapping)):  # a path, YAML text or a mapping, as generate() takes
        spec = load_spec(spec)
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"sample_cases takes a spec (synthmed.load_spec(path)), not {type(spec).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 0):
        raise ValueError(f"limit must be a whole number of cases, 0 or more (or None for every case), got {limit!r}")
    vocab = get_vocabulary()
    cells = enumerate_cells(spec.findings, vocab)
    n = spec.count
    cell_probs = np.array([c.prob for c in cells])
    cell_probs = cell_probs / cell_probs.sum()
    indices = np.arange(n, dtype=np.uint64)
    if spec.allocation == "random":
        words = seed_sequence_state(spec.seed, indices, _LABEL_WORDS)

        def draw(k: int, probs) -> "np.ndarray":
            cum = np.cumsum(probs)
            return np.minimum(np.searchsorted(cum / cum[-1], _uniforms(words, k), side="right"), len(probs) - 1)

        cell = draw(0, cell_probs).astype(np.int32)
        split = draw(1, spec.splits.probs).astype(np.int8)
        sex = draw(2, spec.sex.probs).astype(np.int8)
        view = draw(3, spec.view.probs).astype(np.int8)
        age = age_from_uniform(spec.age, _uniforms(words, 4))
    else:
        words = seed_sequence_state(spec.seed, indices, 2)
        cell, split, sex, view = _exact_allocation(spec, cell_probs, n, cells)
        age_rng = _spec_rng(spec.seed, _AGE_KEY)
        strata = (age_rng.permutation(n) + age_rng.random(n)) / n  # one draw per 1/n-quantile stratum
        age = age_from_uniform(spec.age, strata)
    # 63 bits, so the seed fits a signed 64-bit integer in every tool (pandas, Arrow, SQL, Java)
    seed = (words[:, 0].astype(np.uint64) | (words[:, 1].astype(np.uint64) << np.uint64(32))) & np.uint64(2**63 - 1)
    stop = n if limit is None else min(limit, n)
    return CaseList(spec, cells, cell[:stop], split[:stop], sex[:stop], view[:stop], age[:stop], seed[:stop])


def _attributes(cell: Cell) -> tuple:
    """A cell's attributes whose totals exact allocation keeps within one: each finding's location and severity."""
    return tuple((cell.component, f.finding, part, value) for f in cell.findings
                 for part, value in (("location", f.location), ("severity", f.severity)) if value)


def _exact_allocation(spec: "DatasetSpec", cell_probs, n: int, cells: Sequence[Cell]):
    """Columns for exact allocation: nested rounding cell -> split -> sex -> view, then one permutation."""
    import numpy as np

    # every cell within one of its target, and every entry of the mixture too
    entries = [c.component for c in cells]
    entry = {c: k for k, c in enumerate(dict.fromkeys(entries))}
    targets = [n * float(p) for p in cell_probs]
    groups = [entry[c] for c in entries]
    cell_counts = balance_groups(largest_remainder(n, list(cell_probs)), targets, groups)
    # and each entry's locations and severities, finding by finding, within one where a move can do it
    cell_counts = balance_attributes(cell_counts, targets, groups, [_attributes(cell) for cell in cells])
    per_split = controlled_rounding(cell_counts, spec.splits.probs)
    groups = [(c, s) for c in range(len(cell_counts)) for s in range(len(spec.splits.probs))]
    per_sex = controlled_rounding([per_split[c][s] for c, s in groups], spec.sex.probs)
    groups = [(c, s, x) for (c, s), counts in zip(groups, per_sex) for x in range(len(counts))]
    sizes = [count for counts in per_sex for count in counts]
    per_view = controlled_rounding(sizes, spec.view.probs)
    leaf = np.array([(c, s, x, v) for (c, s, x) in groups for v in range(len(spec.view.probs))], dtype=np.int64)
    leaf_counts = np.array([count for counts in per_view for count in counts], dtype=np.int64)
    columns = np.repeat(leaf, leaf_counts, axis=0)
    order = _spec_rng(spec.seed, _PERMUTATION_KEY).permutation(n)
    columns = columns[order]
    return (columns[:, 0].astype(np.int32), columns[:, 1].astype(np.int8),
            columns[:, 2].astype(np.int8), columns[:, 3].astype(np.int8))
