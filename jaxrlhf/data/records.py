"""The normalized training record and the report of rows that could not become one."""

from collections import Counter
from dataclasses import dataclass, field

MAX_EXAMPLES = 5  # bad rows quoted verbatim in a report; the rest are only counted


@dataclass(frozen=True)
class Record:
    """One example in DeepSpeed-Chat's normalized form.

    SFT trains on prompt + chosen, the reward model on prompt + chosen vs prompt + rejected,
    PPO samples from the prompt. `rejected` is None for single-response (SFT-only) data.
    """

    prompt: str
    chosen: str
    rejected: str | None


@dataclass
class BadRecordReport:
    """What happened to the rows of one or more sources: kept, dropped ties, bad rows by reason."""

    rows: int = 0
    kept: int = 0
    ties_dropped: int = 0
    bad: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # "file:row: reason", first few only

    def add_bad(self, path: str, row: int, reason: str) -> None:
        self.bad[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{path}:{row}: {reason}")

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def malformed(self) -> str:
        """The bad rows in one line: "37 rows were malformed (30 x not valid JSON ...; first: f:3: ...)"."""
        if not self.bad_total:
            return "no row was malformed"
        reasons = ", ".join(f"{count} x {reason}" for reason, count in self.bad.most_common(3))
        more = ", ..." if len(self.bad) > 3 else ""
        rows = "1 row was" if self.bad_total == 1 else f"{self.bad_total} rows were"
        return f"{rows} malformed ({reasons}{more}; first: {', '.join(self.examples[:3])})"

    def merge(self, other: "BadRecordReport") -> "BadRecordReport":
        """A new report summing this one and `other` (examples keep the first few of both)."""
        return BadRecordReport(
            rows=self.rows + other.rows,
            kept=self.kept + other.kept,
            ties_dropped=self.ties_dropped + other.ties_dropped,
            bad=self.bad + other.bad,
            examples=(self.examples + other.examples)[:MAX_EXAMPLES],
        )

    def __str__(self) -> str:
        lines = [f"{self.rows} rows read, {self.kept} kept, {self.ties_dropped} ties dropped, {self.bad_total} bad"]
        lines += [f"  {count} x {reason}" for reason, count in self.bad.most_common()]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)
