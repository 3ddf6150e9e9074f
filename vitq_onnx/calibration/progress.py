"""Progress of long calibration stages: a live bar with ETA on a terminal, one line per stage off it."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """``update(n, **postfix)``; ``close()`` prints the stage's summary line when not on a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "it"):
        self.desc, self.total, self.enabled, self.start = desc, total, enabled, time.time()
        self.live = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if self.live else None
        self.done, self.postfix = 0, {}

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            extra = "".join(f", {k} {_fmt(v)}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.done}/{self.total} in {time.time() - self.start:.1f} s{extra}",
                  file=sys.stderr)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
