"""Progress of one run: a tqdm bar when tqdm is installed and the output is a terminal, else a line every
10% of the budget (a captured log stays readable: no carriage-return redraws)."""
import sys

from .. import _deps

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # tqdm is optional (the `bench` extra): the line printer below replaces it
    _tqdm = None


class Progress:
    def __init__(self, label: str, total: float, unit: str, stream=None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.note_text = ""
        self._next_line = 0.1
        self._printed = None
        self._bar = None
        is_terminal = getattr(self.stream, "isatty", lambda: False)()
        if _tqdm is None and is_terminal:  # said once per process; in a captured log lines are the norm
            _deps.note_missing("tqdm", "bench", "cggr bench", "progress is printed as lines, not a bar",
                               log=lambda msg: print(msg, file=self.stream, flush=True))
        if _tqdm is not None and is_terminal:
            self._bar = _tqdm(total=total, desc=label, unit=unit, file=self.stream, leave=True,
                              bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n:.0f}/{total:.0f} {unit} "
                                         "[{elapsed}<{remaining}{postfix}]")

    def advance(self, amount: float):
        self.done += amount
        if self._bar is not None:
            # the last step may overshoot the budget a little: keep the bar within its total
            self._bar.update(min(amount, max(0.0, self.total - self._bar.n)))
        elif self.done >= self._next_line * self.total:
            self._print()
            while self._next_line * self.total <= self.done:
                self._next_line += 0.1

    def note(self, text: str):
        self.note_text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _print(self):
        self._printed = self.done
        pct = min(100.0, 100.0 * self.done / self.total)
        print(f"{self.label}: {pct:3.0f}% {self.done:,.0f}/{self.total:,.0f} {self.unit} {self.note_text}",
              file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self._printed != self.done:  # the last line already says 100%
            self._print()
