"""Progress of long stages (calibration, validation, evaluation): a live bar with ETA on a terminal; off a terminal (logs)
a line at most once a minute with the ETA, and one when the stage ends."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

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


def sayer(enabled: bool):
    """``say(msg)``: one line on stderr, or nothing when progress is off (``-q``)."""
    return (lambda msg: print(msg, file=sys.stderr)) if enabled else (lambda msg: None)


class StageTimes(dict):
    """Seconds spent per stage of an export (``with times("stage"): ...``) and the process's peak
    memory when each stage ended (``peak_mb``), for the profile benchmark and the closing line;
    never stored in an artifact, which stays reproducible."""

    def __init__(self):
        super().__init__()
        self.peak_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start
            self.peak_mb[name] = peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, since ``ru_maxrss`` keeps the parent's
    peak across fork and exec (a benchmark's child would report its parent's memory)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
