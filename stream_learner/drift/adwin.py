"""ADWIN (adaptive windowing), a pure-Python port of River's ADWIN whose state is plain floats.

River 0.26's ADWIN keeps its window in a Rust object whose only state is an
opaque bincode blob of a private struct (and restoring a malformed one raises
PyO3's ``PanicException``, which is not an ``Exception``). This port keeps the
window in lists of floats, so it saves to an :class:`~.state.ADWINWindow`, and
matches River's signals and estimates bit for bit (the tests check it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from river import base as river_base

from .state import ADWINWindow, DriftStateError, require_finite


class ADWIN(river_base.DriftDetector):
    """ADWIN (adaptive windowing), a pure-Python port of ``river.drift.ADWIN``.

    Same parameters, signals and estimates as River 0.26's Rust ADWIN, bit for
    bit (arithmetic in the same order), but its window is plain lists of
    floats, so its state serializes to JSON. See River's documentation for the
    algorithm; ``delta`` is the significance (smaller: fewer false alarms,
    later detection) and values are assumed roughly within [0, 1].

    >>> import random
    >>> rng = random.Random(12345)
    >>> adwin = ADWIN()
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> for i, x in enumerate(stream):
    ...     adwin.update(x)
    ...     if adwin.drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 1023
    """

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        super().__init__()
        # Python raises where Rust's f64 would go NaN, so refuse what could get there.
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        counts = (clock, max_buckets, min_window_length, grace_period)
        if not all(type(n) is int for n in counts) or min(counts[:3]) < 1 or grace_period < 0:
            raise ValueError("clock, max_buckets and min_window_length must be integers >= 1, grace_period >= 0")
        self.delta = delta
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._total = 0.0
        self._variance = 0.0
        self._width = 0.0
        self._tick = 0
        # Row i holds the (total, variance) summaries of buckets of 2**i values, oldest first.
        self._totals: list[list[float]] = [[]]
        self._variances: list[list[float]] = [[]]

    @property
    def width(self) -> float:
        """Window size."""
        return self._width

    @property
    def total(self) -> float:
        """The sum of the values in the window."""
        return self._total

    @property
    def variance(self) -> float:
        """The sum of squared deviations in the window (River calls it the variance too)."""
        return self._variance

    @property
    def estimation(self) -> float:
        """The mean of the window."""
        return self._total / self._width if self._width else 0.0

    def window(self) -> ADWINWindow:
        """The running state, to continue from with :meth:`restore`."""
        return ADWINWindow(
            drift_detected=self._drift_detected,
            tick=self._tick,
            width=self._width,
            total=self._total,
            variance=self._variance,
            totals=[list(row) for row in self._totals],
            variances=[list(row) for row in self._variances],
        )

    def restore(self, window: ADWINWindow, *, what: str = "ADWIN window") -> None:
        """Continue from a :meth:`window` of an ADWIN with these parameters.

        Raises :class:`~.state.DriftStateError`, and changes nothing, if the
        window could not have come from one: rows of unequal lengths or longer
        than ``max_buckets``, a width that is not the number of values in the
        buckets, non-finite numbers (any of these would break the arithmetic
        later, far from the cause). ``what`` names the window in the error.

        >>> a, b = ADWIN(), ADWIN()
        >>> for x in [0, 1] * 100:
        ...     a.update(x)
        >>> b.restore(a.window())
        >>> (b.width, b.estimation) == (a.width, a.estimation) == (200.0, 0.5)
        True
        """
        totals, variances = window.totals, window.variances
        if len(totals) != len(variances) or any(len(t) != len(v) for t, v in zip(totals, variances)):
            raise DriftStateError(f"{what}: totals and variances differ in shape")
        if any(len(row) > self.max_buckets for row in totals):
            raise DriftStateError(f"{what}: a row holds more than max_buckets={self.max_buckets} buckets")
        require_finite(
            what,
            [
                window.width,
                window.total,
                window.variance,
                *(x for row in totals for x in row),
                *(x for row in variances for x in row),
            ],
        )
        if window.width != float(sum(len(row) << i for i, row in enumerate(totals))):
            raise DriftStateError(f"{what}: width {window.width} is not the number of values in its buckets")
        self._drift_detected = window.drift_detected
        self._tick = window.tick
        self._width, self._total, self._variance = window.width, window.total, window.variance
        self._totals = [list(row) for row in totals]
        self._variances = [list(row) for row in variances]

    def update(self, x: float) -> None:
        """Add one value; ``drift_detected`` then says whether the window was cut."""
        if self._drift_detected:
            # River drops the whole window on the update after a detection; so do we.
            self._reset()
        self._insert(float(x))
        self._drift_detected = self._detect_change()

    def update_many(self, values: Iterable[float], estimates: list[float] | None = None) -> list[int]:
        """:meth:`update` with each value in turn, with bit-identical results; the positions after
        which ``drift_detected`` was true. ``estimates``, if given, gets :attr:`estimation` after
        each value.

        Cheaper than a loop of :meth:`update` (the trainer feeds every example's signals): a change
        can only be detected on a clock tick, so the values in between are inserted with the
        running sums in local variables, by the same arithmetic as :meth:`_insert`.
        """
        xs = [float(x) for x in values]
        detected: list[int] = []
        clock, n, j = self.clock, len(xs), 0
        while j < n:
            if self._drift_detected:
                self._reset()
            # The update that makes the tick a multiple of the clock is the only one that checks.
            k = min(clock - self._tick % clock, n - j)
            self._insert_run(xs[j : j + k], estimates)
            self._tick += k - 1
            j += k
            self._drift_detected = self._detect_change()  # counts the run's last tick
            if self._drift_detected:
                detected.append(j - 1)
                if estimates is not None:
                    estimates[-1] = self.estimation  # after the cut
        return detected

    def _insert_run(self, xs: list[float], estimates: list[float] | None) -> None:
        """:meth:`_insert` of each value, with the sums in locals (same operations, same order)."""
        totals, variances, full, max_buckets = self._totals, self._variances, self.max_buckets + 1, self.max_buckets
        total, variance, width = self._total, self._variance, self._width
        row0_t, row0_v = totals[0], variances[0]  # row 0 is never dropped while inserting
        in_row0 = len(row0_t)
        record = estimates.append if estimates is not None else None
        for value in xs:
            row0_t.append(value)
            row0_v.append(0.0)
            before = width  # == width - 1.0 after the increment, exactly (whole numbers below 2**53)
            width += 1.0
            if width > 1.0:
                d = value - total / before
                variance += before * d * d / width
            else:
                variance += 0.0
            total += value
            in_row0 += 1
            if in_row0 == full:
                # Row 0 holds single values (size 1: the means are the totals, and n * 0.5 is 0.5).
                t0, t1 = row0_t[0], row0_t[1]
                merged_variance = row0_v[0] + row0_v[1] + 0.5 * (t0 - t1) * (t0 - t1)
                if len(totals) == 1:
                    totals.append([])
                    variances.append([])
                row1 = totals[1]
                row1.append(t0 + t1)
                variances[1].append(merged_variance)
                del row0_t[:2], row0_v[:2]
                in_row0 -= 2
                row = 1
                while len(totals[row]) == full:
                    size = float(1 << row)
                    t_row, v_row = totals[row], variances[row]
                    t0, t1 = t_row[0], t_row[1]
                    mu0, mu1 = t0 / size, t1 / size
                    merged_variance = v_row[0] + v_row[1] + size * 0.5 * (mu0 - mu1) * (mu0 - mu1)
                    if row + 1 == len(totals):
                        totals.append([])
                        variances.append([])
                    totals[row + 1].append(t0 + t1)
                    variances[row + 1].append(merged_variance)
                    del t_row[:2], v_row[:2]
                    if len(totals[row + 1]) <= max_buckets:
                        break
                    row += 1
            if record is not None:
                record(total / width)
        self._total, self._variance, self._width = total, variance, width

    def _insert(self, value: float) -> None:
        self._totals[0].append(value)
        self._variances[0].append(0.0)
        self._width += 1.0
        increment = 0.0
        if self._width > 1.0:
            d = value - self._total / (self._width - 1.0)
            increment = (self._width - 1.0) * d * d / self._width
        self._variance += increment
        self._total += value
        # Merge the two oldest buckets of a full row into the next row, as far up as needed.
        totals, variances, full = self._totals, self._variances, self.max_buckets + 1
        row = 0
        while len(totals[row]) == full:
            n = float(1 << row)
            t0, t1 = totals[row][0], totals[row][1]
            mu0, mu1 = t0 / n, t1 / n
            merged_variance = variances[row][0] + variances[row][1] + n * 0.5 * (mu0 - mu1) * (mu0 - mu1)
            if row + 1 == len(totals):
                totals.append([])
                variances.append([])
            totals[row + 1].append(t0 + t1)
            variances[row + 1].append(merged_variance)
            del totals[row][:2], variances[row][:2]
            if len(totals[row + 1]) <= self.max_buckets:
                break
            row += 1

    def _delete_oldest(self) -> None:
        last = len(self._totals) - 1
        n = float(1 << last)
        u = self._totals[last].pop(0)
        v = self._variances[last].pop(0)
        mu = u / n
        self._width -= n
        self._total -= u
        mu_window = self._total / self._width
        self._variance -= v + n * self._width * (mu - mu_window) * (mu - mu_window) / (n + self._width)
        if not self._totals[last]:
            self._totals.pop()
            self._variances.pop()

    def _detect_change(self) -> bool:
        self._tick += 1
        if self._tick % self.clock or not self._width > self.grace_period:
            return False
        changed = False
        while self._cut_once():
            changed = True
        return changed

    def _cut_once(self) -> bool:
        """Scan the cut points, oldest first; drop the oldest bucket at the first significant one."""
        width, mwl = self._width, self.min_window_length
        # No cut point has mwl values on both sides (and log(log(1)) below is undefined).
        if width < 2 or width < 2 * mwl:
            return False
        n0, n1, u0, u1 = 0.0, width, 0.0, self._total
        # River's bound, split: the parts that do not depend on the cut point are computed once
        # per scan, with the same operations in the same order (bit-identical bounds).
        delta_prime = math.log(2.0 * math.log(width) / self.delta)
        mean_variance = self._variance / width
        two_thirds_delta_prime = 2.0 / 3.0 * delta_prime
        sqrt, nan = math.sqrt, math.nan
        # n0 - mwl + 1.0 is n0 - (mwl - 1.0) exactly: whole numbers far below 2**53.
        below = mwl - 1.0
        rows = self._totals
        for row in range(len(rows) - 1, -1, -1):
            size = float(1 << row)
            # Row 0's newest bucket is never a cut point (nothing would be left after it).
            totals = rows[row] if row else rows[0][:-1]
            for t in totals:
                n0 += size
                n1 -= size
                u0 += t
                u1 -= t
                if n1 < mwl:
                    return False  # n1 only shrinks from here: no later cut point has mwl values after it
                if n0 >= mwl:
                    m_recip = 1.0 / (n0 - below) + 1.0 / (n1 - below)
                    gap = abs(u0 / n0 - u1 / n1)
                    floor = two_thirds_delta_prime * m_recip
                    # epsilon = sqrt(x) + floor >= floor (rounding is monotonic), so a gap within
                    # floor is never significant: the square root is only needed past it.
                    if gap <= floor:
                        continue
                    x = 2.0 * m_recip * mean_variance * delta_prime
                    # Rounding can leave the variance a hair below zero: Rust's sqrt gives NaN (no cut).
                    epsilon = (sqrt(x) if x >= 0.0 else nan) + floor
                    if gap > epsilon:
                        self._delete_oldest()
                        return True
        return False
