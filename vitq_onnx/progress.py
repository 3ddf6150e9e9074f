"""Progress of long stages (calibration, validation, evaluation): a live bar with ETA on a terminal; off a terminal (logs)
a line at most once a minute with the ETA, and one when the stage ends."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


LOG_EVERY = 60.0  # seconds between log lines off a terminal


class Progress:
    """``update(n, **postfix)``; ``close()`` prints the stage's summary line when not on a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "it"):
        self.desc, self.total, self.enabled, self.start = desc, total, enabled, time.time()
        self.live = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if self.live else None
        self.done, self.postfix, self.logged = 0, {}, self.start

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.time() - self.logged >= LOG_EVERY and self.done < self.total:
            self.logged = time.time()
            eta = (self.logged - self.start) / self.done * (self.total - self.done)
            print(f"{self.desc}: {self.done}/{self.total}, ETA {eta:.0f} s{self._extra()}", file=sys.stderr)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(f"{self.desc}: {self.done}/{self.total} in {time.time() - self.start:.1f} s{self._extra()}",
                  file=sys.stderr)

    def _extra(self) -> str:
        return "".join(f", {k} {_fmt(v)}" for k, v in self.postfix.items())


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
