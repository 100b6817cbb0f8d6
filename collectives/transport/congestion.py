"""Congestion control: a model-based controller in the spirit of BBR.

Why not a loss-based controller (Reno, CUBIC): they halve the window on every loss, so 1 % random
loss on a long WAN path (a VPN, a lossy radio hop) caps throughput at a small fraction of the
link.  A cluster moving model weights over such a path needs the link rate, not the rate loss
allows.  So, as BBR does, the sender builds a model of the path from what ACKs show:

* ``btlbw``: the bottleneck bandwidth, the maximum delivery rate seen over the last ~10 round
  trips (a maximum, because queueing and ACK jitter only ever make a sample look slower);
* ``min_rtt``: the propagation delay, the minimum RTT over ~10 s (a minimum, because queueing
  only ever makes a sample look longer);

and then paces at ``gain * btlbw`` with a window of about ``2 * btlbw * min_rtt`` (2 BDP), cycling
the gain (1.25, 0.75, then six rounds of 1) so that it keeps finding out whether more bandwidth has
appeared, and draining the queue it made doing so.

Loss.  Random loss does not touch the model.  When loss happens after the bottleneck (it used
link capacity and then vanished), delivery samples show ``link * (1 - loss)``; pacing at that
would leave the link idle by the loss fraction.  So the controller also keeps ``loss_rate``, the
loss rate of round trips that built no queue (whose RTT stayed near ``min_rtt``): loss there is
not ours, since we were not overfilling anything, and the send rate is ``btlbw / (1 - loss_rate)``
(capped), applied only while the last round trip stayed queue-free (so the max filter's upward
bias under noisy loss cannot grow a standing queue: that queue switches it off again).  Behind
such a queue the rate is the last round's mean delivery rate, compensated, less 5 %: the queue
drains, and the link is not left idle by the whole loss rate once it has.  Loss in
round trips with a standing queue is not counted there, so the controller cannot talk itself
into overrunning a queue.  Only a round trip losing far more than that
(BBRv2's idea) bounds the data in flight (``inflight_hi``), which then grows back, faster and
faster, while loss stays normal.

Four more published ideas, each for a way the plain model throttles a fast or clean path:

* ACK aggregation (BBR's ``extra_acked``): a receiver that batches its ACKs (a CPU-bound one on
  loopback, or our ACK-every-16-segments policy) delivers bytes in bursts the ``btlbw * min_rtt``
  window does not allow for, so the window runs out before the next burst of ACKs and the path
  goes idle.  The controller measures how many bytes ACKs delivered beyond what ``btlbw`` would
  have delivered over the same time, keeps the maximum over recent rounds, and adds it to cwnd.
* Very short RTTs (a LAN, loopback): ``btlbw * min_rtt`` is a few tens of KB, less than a
  couple of GSO batches, while the host's own scheduling delays are far longer than the path's
  RTT.  Below :data:`SHORT_RTT` the window never goes below :data:`SHORT_RTT_MIN_CWND`.
* Leaving STARTUP when the queue starts growing (HyStart++'s delay test, RFC 9406): a round whose
  smallest RTT is clearly above ``min_rtt`` means the pipe is full and the excess is queueing;
  waiting for the bandwidth plateau instead would keep sending at 2.9x the link for three more
  rounds and overflow a one-BDP queue.  Random loss does not move the RTT, so unlike a loss test
  this cannot end STARTUP early on a lossy path.
* Skipping PROBE_RTT when it would learn nothing (Chromium's QUIC BBR): if, when the ``min_rtt``
  estimate expires, the latest round saw RTTs within 12.5 % of it, the path has no standing
  queue and the estimate is simply renewed, instead of halving the window for 200 ms.  Any RTT
  within the queue loss compensation tolerates, seen in the last two gain cycles, counts too: the
  probe-down phase drains that queue once a cycle, so a healthy lossy flow never pays for it.

And two for lossy long paths: losses found while DRAIN empties STARTUP's overshoot do not bound
inflight (they are STARTUP's; the inflight of the round that finds them was already drained),
and the first queue-free round sets ``loss_rate`` outright instead of moving an EWMA from zero.

All of this is driven by :class:`RateSample` values that :mod:`.recovery` computes per ACK.
"""

from __future__ import annotations

import math
from enum import Enum

from .bbr_params import (
    BTLBW_WINDOW_ROUNDS,
    EXTRA_ACKED_MAX_TIME,
    EXTRA_ACKED_ROUNDS,
    FULL_BW_GROWTH,
    FULL_BW_ROUNDS,
    HIGH_LOSS,
    HIGH_LOSS_MIN_PACKETS,
    INFLIGHT_HI_BETA,
    INITIAL_WINDOW_BYTES,
    LOSS_RATE_GAIN,
    MAX_LOSS_COMPENSATION,
    MIN_RTT_WINDOW,
    NEAR_MIN_RTT_CYCLES,
    PROBE_BW_CWND_GAIN,
    PROBE_BW_GAINS,
    PROBE_RTT_DURATION,
    QUEUE_DRAIN_MARGIN,
    QUEUE_FREE_SLACK,
    SHORT_RTT,
    SHORT_RTT_MIN_CWND,
    SIMILAR_MIN_RTT,
    STARTUP_CWND_GAIN,
    STARTUP_GAIN,
    STARTUP_LOSS_ROUNDS,
    STARTUP_RTT_DIVISOR,
    STARTUP_RTT_MAX_THRESH,
    STARTUP_RTT_MIN_THRESH,
    STARTUP_RTT_SAMPLES,
)
from .rate_sample import Congestion, RateSample
from .rtt import WindowedFilter

__all__ = [
    "INITIAL_WINDOW_BYTES",
    "PROBE_BW_GAINS",
    "SHORT_RTT",
    "SHORT_RTT_MIN_CWND",
    "STARTUP_GAIN",
    "STARTUP_LOSS_ROUNDS",
    "STARTUP_RTT_SAMPLES",
    "Bbr",
    "BbrState",
    "Congestion",
    "RateSample",
]


class BbrState(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"
    PROBE_RTT = "probe_rtt"


_STARTUP = BbrState.STARTUP
_PROBE_BW = BbrState.PROBE_BW
_INF = math.inf


class Bbr:
    """The model-based controller described in the module docstring."""

    def __init__(
        self,
        *,
        max_datagram: int = 1200,
        initial_rtt: float = 0.1,
        initial_window_packets: int = 32,
        now: float = 0.0,
    ) -> None:
        self.max_datagram = max_datagram
        self.initial_rtt = initial_rtt
        self.initial_cwnd = max(initial_window_packets * max_datagram, INITIAL_WINDOW_BYTES)
        self.min_cwnd = 4 * max_datagram
        self._short_floor = max(self.min_cwnd, SHORT_RTT_MIN_CWND)  # _floor() on a short path
        self.cwnd = self.initial_cwnd
        self.pacing_rate = STARTUP_GAIN * self.initial_cwnd / initial_rtt
        self._bw_filter = WindowedFilter(BTLBW_WINDOW_ROUNDS, maximum=True)
        self.btlbw = 0.0
        self.min_rtt = math.inf
        self._min_rtt_stamp = now
        self._near_min_rtt_at = now  # when an RTT sample last came within SIMILAR_MIN_RTT
        self.loss_rate = 0.0
        self._clean_rounds = 0  # rounds that fed loss_rate
        self._startup_losses_until = 0  # round before which losses are STARTUP's (see _end_round)
        self.inflight_hi = math.inf
        self._inflight_hi_step = max_datagram
        self.extra_acked = 0.0
        self._extra_filter = WindowedFilter(EXTRA_ACKED_ROUNDS, maximum=True)
        self._agg_start = now
        self._agg_acked = 0
        self._reset(now)

    def _reset(self, now: float) -> None:
        self.state = BbrState.STARTUP
        self.pacing_gain = STARTUP_GAIN
        self.cwnd_gain = STARTUP_CWND_GAIN
        self.filled_pipe = False
        self._full_bw = 0.0
        self._full_bw_count = 0
        self.round_count = 0
        self._next_round_delivered = 0
        self._cycle_index = 0
        self._cycle_stamp = now
        self._probe_rtt_done_at: float | None = None
        self._probe_rtt_round = 0
        self._queue_free = self._round_queue_free()
        self._round_acked = 0
        self._round_rate = 0.0
        self._round_start_at = now
        self._round_start_delivered = 0
        self._round_lost = 0
        self._round_max_rtt = 0.0
        self._round_min_rtt = math.inf
        self._round_rtt_samples = 0
        self._last_round_min_rtt = math.inf
        self._round_max_inflight = 0
        self._round_gain = STARTUP_GAIN
        self._queue_free = False

    # -- the model -------------------------------------------------------------------------------

    @property
    def send_bw(self) -> float:
        """The rate that keeps the bottleneck busy: delivered rate plus what random loss eats."""
        return self.btlbw / (1.0 - min(self.loss_rate, MAX_LOSS_COMPENSATION))

    def _path_rtt(self) -> float:
        return self.min_rtt if math.isfinite(self.min_rtt) else self.initial_rtt

    def _floor(self) -> int:
        """The smallest window: four datagrams, or SHORT_RTT_MIN_CWND on a path with a tiny RTT."""
        return self._short_floor if self.min_rtt < SHORT_RTT else self.min_cwnd

    def bdp(self, gain: float = 1.0) -> int:
        """``gain`` times the bandwidth-delay product, in bytes (the initial window before any
        bandwidth sample exists)."""
        if self.btlbw <= 0:
            return int(gain * self.initial_cwnd)
        return int(gain * self.send_bw * self._path_rtt())

    # -- inputs ------------------------------------------------------------------------------

    def on_sent(self, size: int, bytes_in_flight: int, now: float) -> None:
        most = self._round_max_inflight  # max() as a compare: once per frame
        self._round_max_inflight = bytes_in_flight if bytes_in_flight > most else most

    def on_loss(self, lost_bytes: int, bytes_in_flight: int, now: float) -> None:
        self._round_lost += lost_bytes

    def on_timeout(self, pto_count: int, now: float) -> None:
        # Three probe timeouts in a row: the path stopped answering (RFC 9002's persistent
        # congestion).  Whatever it is when it answers again, the old model is no guide: start
        # over, with the window we would open a new session with.
        if pto_count >= 3 and self.filled_pipe:
            self._bw_filter = WindowedFilter(BTLBW_WINDOW_ROUNDS, maximum=True)
            self.btlbw = 0.0
            self.inflight_hi = math.inf
            self.cwnd = self.initial_cwnd
            self.pacing_rate = STARTUP_GAIN * self.initial_cwnd / self._path_rtt()
            self._reset(now)

    def on_ack(self, sample: RateSample, now: float) -> None:
        state = self.state
        if (state is not _STARTUP and state is not _PROBE_BW) or (
            now - self._min_rtt_stamp > MIN_RTT_WINDOW
        ):
            self._on_ack_general(sample, now)
            return
        # Fast path, once per ACK: in STARTUP or PROBE_BW with min_rtt not expired, no PROBE_RTT
        # is entered or run, so this is _on_ack_general without those branches and with its
        # per-ACK helpers inlined (a test feeds both the same samples and compares the state).
        (rate, app_limited, prior_delivered, delivered_total, newly_acked, newly_lost, _,
         bytes_in_flight, rtt) = sample  # fmt: skip
        self._round_acked += newly_acked
        self._round_lost += newly_lost
        if rtt is not None:
            most, least = self._round_max_rtt, self._round_min_rtt  # max(), min() as compares
            self._round_max_rtt = rtt if rtt > most else most
            self._round_min_rtt = rtt if rtt < least else least
            self._round_rtt_samples += 1
        round_start = False
        if newly_acked and prior_delivered >= self._next_round_delivered:
            self._end_round(sample, now)
            self._next_round_delivered = delivered_total
            self.round_count += 1
            round_start = True
        # _update_btlbw ("not <=" as there: a NaN rate is not refused)
        if rate is not None and not rate <= 0 and not (app_limited and rate < self.btlbw):
            self.btlbw = self._bw_filter.update(rate, self.round_count)
        btlbw = self.btlbw
        if self.filled_pipe and btlbw > 0 and newly_acked:
            # _update_extra_acked, inlined (min() as a compare)
            expected = btlbw * (now - self._agg_start)
            agg = self._agg_acked
            if agg <= expected:
                self._agg_start = now
                agg = 0
                expected = 0.0
            agg += newly_acked
            self._agg_acked = agg
            extra = agg - expected
            window = float(self.cwnd)
            extra = window if window < extra else extra
            self.extra_acked = self._extra_filter.update(extra, self.round_count)
        # _update_min_rtt while the estimate has not expired.
        if rtt is not None:
            if rtt <= self.min_rtt:
                self.min_rtt = rtt
                self._min_rtt_stamp = self._near_min_rtt_at = now
            elif rtt <= (1 + QUEUE_FREE_SLACK) * self.min_rtt:
                self._near_min_rtt_at = now
        if state is _STARTUP:
            if round_start and not app_limited:  # (_check_full_pipe skips app-limited samples)
                self._check_full_pipe(sample)
            self._check_startup_delay(round_start)
            if self.filled_pipe:
                self.state = BbrState.DRAIN
                self.pacing_gain = 1.0 / STARTUP_GAIN
                self.cwnd_gain = STARTUP_GAIN
                if bytes_in_flight <= self.bdp():
                    self._startup_losses_until = self.round_count + STARTUP_LOSS_ROUNDS
                    self._enter_probe_bw(now)
        if self.state is _PROBE_BW:
            self._advance_cycle(sample, now)
        self._set_outputs()

    def _on_ack_general(self, sample: RateSample, now: float) -> None:
        """:meth:`on_ack` in every state (its fast path covers the common ones)."""
        self._round_acked += sample.newly_acked
        self._round_lost += sample.newly_lost
        rtt = sample.rtt
        if rtt is not None:
            self._round_max_rtt = max(self._round_max_rtt, rtt)
            self._round_min_rtt = min(self._round_min_rtt, rtt)
            self._round_rtt_samples += 1
        round_start = False
        if sample.newly_acked and sample.prior_delivered >= self._next_round_delivered:
            self._end_round(sample, now)
            self._next_round_delivered = sample.delivered_total
            self.round_count += 1
            round_start = True
        self._update_btlbw(sample)
        self._update_extra_acked(sample, now)
        min_rtt_expired = self._update_min_rtt(sample, now)
        if self.state is BbrState.STARTUP:
            if round_start:
                self._check_full_pipe(sample)
            self._check_startup_delay(round_start)
        if self.state is BbrState.STARTUP and self.filled_pipe:
            self.state = BbrState.DRAIN
            self.pacing_gain = 1.0 / STARTUP_GAIN
            self.cwnd_gain = STARTUP_GAIN
        if self.state is BbrState.DRAIN and sample.bytes_in_flight <= self.bdp():
            # Packets sent in STARTUP may still be found lost one round later (see _end_round).
            self._startup_losses_until = self.round_count + STARTUP_LOSS_ROUNDS
            self._enter_probe_bw(now)
        if self.state is BbrState.PROBE_BW:
            self._advance_cycle(sample, now)
        self._update_probe_rtt(sample, now, min_rtt_expired, round_start)
        self._set_outputs()

    # -- round accounting and loss -----------------------------------------------------------

    def _end_round(self, sample: RateSample, now: float) -> None:
        # The round's mean delivery rate: link * (1 - loss) with a queue, and no max-filter bias.
        elapsed, delivered = now - self._round_start_at, sample.delivered_total
        if elapsed > 0 and self._round_start_delivered:  # (none in a first round)
            self._round_rate = (delivered - self._round_start_delivered) / elapsed
        self._round_start_at, self._round_start_delivered = now, delivered
        acked, lost = self._round_acked, self._round_lost
        total = acked + lost
        # Computed once: nothing below changes what it reads.
        queue_free = self._round_queue_free()
        if total > 0:
            rate = lost / total
            if self.state is BbrState.DRAIN or self.round_count < self._startup_losses_until:
                # Losses of STARTUP's overshoot, detected a round or two later (a queue's
                # worth of delay): DRAIN already removes their cause, and judging them by the
                # inflight of the round that detects them (drained by then) set inflight_hi
                # below the BDP, which then capped a 10 %-loss flow at 85 % for seconds.
                pass
            elif lost and self._is_loss_excessive(rate, lost):  # (no loss is never excessive)
                self._on_high_loss()
            else:
                if self.inflight_hi != _INF:  # (else _grow_inflight_hi has nothing to grow)
                    self._grow_inflight_hi()
                # A clean round: no queue of ours (RTT near the minimum), no probing gain.
                if self.filled_pipe and self._round_gain <= 1.0 and queue_free:
                    if self._clean_rounds == 0:
                        # The first estimate replaces the initial 0 outright: an EWMA from 0
                        # took ten rounds (a second at 100 ms) to pace for 10 % loss.
                        self.loss_rate = rate
                    else:
                        self.loss_rate += LOSS_RATE_GAIN * (rate - self.loss_rate)
                    self._clean_rounds += 1
        self._queue_free = queue_free
        self._round_acked = 0
        self._round_lost = 0
        self._round_max_rtt = 0.0
        self._last_round_min_rtt = self._round_min_rtt
        self._round_min_rtt = math.inf
        self._round_rtt_samples = 0
        self._round_max_inflight = sample.bytes_in_flight
        self._round_gain = self.pacing_gain

    def _is_loss_excessive(self, rate: float, lost: int) -> bool:
        threshold = max(HIGH_LOSS, 2 * self.loss_rate + 0.1)
        return rate > threshold and lost >= HIGH_LOSS_MIN_PACKETS * self.max_datagram

    def _round_queue_free(self) -> bool:
        min_rtt = self.min_rtt
        if not math.isfinite(min_rtt):
            return False
        slack = QUEUE_FREE_SLACK * min_rtt
        slack = 0.002 if slack < 0.002 else slack  # max(slack, 2 ms) as a compare
        return 0 < self._round_max_rtt <= min_rtt + slack

    def _on_high_loss(self) -> None:
        # The inflight that lost too much was too much; a BDP is never too much (it is what
        # the link holds with no queue at all), so the bound never starves the pacing rate.
        bound = max(INFLIGHT_HI_BETA * self._round_max_inflight, self.bdp(), self._floor())
        self.inflight_hi = min(self.inflight_hi, bound)
        self._inflight_hi_step = self.max_datagram
        if self.state is BbrState.STARTUP:
            # Overflowing a queue is as clear a sign of a full pipe as a bandwidth plateau.
            self.filled_pipe = True

    def _grow_inflight_hi(self) -> None:
        if not math.isfinite(self.inflight_hi):
            return
        if self._round_max_inflight + self.max_datagram < self.inflight_hi:
            return  # not using the bound: nothing learnt about it
        self.inflight_hi += self._inflight_hi_step
        self._inflight_hi_step *= 2
        if self.inflight_hi >= PROBE_BW_CWND_GAIN * self.bdp():
            self.inflight_hi = math.inf  # as big as the window itself: no longer a bound

    # -- the model's filters -------------------------------------------------------------------

    def _update_btlbw(self, sample: RateSample) -> None:
        rate = sample.delivery_rate
        if rate is None or rate <= 0:
            return
        # An app-limited sample shows what the application offered, not what the path can
        # carry, so it may raise the estimate but never lower it.
        if sample.is_app_limited and rate < self.btlbw:
            return
        self.btlbw = self._bw_filter.update(rate, self.round_count)

    def _update_extra_acked(self, sample: RateSample, now: float) -> None:
        """Track ACK aggregation: bytes ACKed beyond what ``btlbw`` explains (see the docstring).

        An aggregation epoch runs while ACKs stay ahead of the model's clock; once they fall
        back to (or below) what ``btlbw`` predicts for the time since it began, a new one starts.
        """
        # Only once the pipe is full: before, btlbw lags the real rate by design and every ACK
        # would look like aggregation (and the window grows by other means then anyway).
        if not self.filled_pipe or self.btlbw <= 0 or not sample.newly_acked:
            return
        expected = self.btlbw * (now - self._agg_start)
        if self._agg_acked <= expected:
            self._agg_start = now
            self._agg_acked = 0
            expected = 0.0
        self._agg_acked += sample.newly_acked
        # Never more than a window: a burst of ACKs cannot release more than was in flight.
        extra = min(self._agg_acked - expected, float(self.cwnd))
        self.extra_acked = self._extra_filter.update(extra, self.round_count)

    def _update_min_rtt(self, sample: RateSample, now: float) -> bool:
        expired = now - self._min_rtt_stamp > MIN_RTT_WINDOW
        rtt = sample.rtt
        if rtt is not None and rtt <= self.min_rtt:
            self.min_rtt = rtt
            self._min_rtt_stamp = self._near_min_rtt_at = now
            return False
        if rtt is not None and rtt <= (1 + QUEUE_FREE_SLACK) * self.min_rtt:
            self._near_min_rtt_at = now
        recent = now - self._near_min_rtt_at <= NEAR_MIN_RTT_CYCLES * len(PROBE_BW_GAINS) * (
            self._path_rtt()
        )
        if expired and (recent or self._last_round_min_rtt <= SIMILAR_MIN_RTT * self.min_rtt):
            # The last round within 12.5 % of min_rtt, or any RTT lately within the queue that
            # loss compensation tolerates (QUEUE_FREE_SLACK; probe-down phases keep it there):
            # no standing queue of ours to drain, so PROBE_RTT would only halve the window to
            # relearn what we know (it cost 1.5 % of a 1 %-loss transfer, one per 10 s).
            # A path whose delay grew by less than that slack keeps the old min_rtt: its window
            # (2 BDP) has room for it, and pacing does not depend on min_rtt.
            self._min_rtt_stamp = now
            return False
        if rtt is not None and expired:
            self.min_rtt = rtt
            self._min_rtt_stamp = now
        return expired

    def _check_startup_delay(self, round_start: bool) -> None:
        """HyStart++'s delay test (see the docstring): on the round that just ended, and, as
        RFC 9406 does, on every ACK once the current round has ``STARTUP_RTT_SAMPLES`` RTT
        samples.  Waiting for the round's end lets a round of 2.9x pacing pile onto a queue
        that is already growing: on a 100 ms path that was 1800 drops at a one-BDP queue."""
        if self.filled_pipe:
            return
        if round_start:
            rtt = self._last_round_min_rtt
        elif self._round_rtt_samples >= STARTUP_RTT_SAMPLES:
            rtt = self._round_min_rtt
        else:
            return
        if not math.isfinite(rtt):
            return
        # min(max(min_rtt / 8, 4 ms), 16 ms) as compares (this runs on every STARTUP ACK).
        thresh = self.min_rtt / STARTUP_RTT_DIVISOR
        thresh = STARTUP_RTT_MIN_THRESH if thresh < STARTUP_RTT_MIN_THRESH else thresh
        thresh = STARTUP_RTT_MAX_THRESH if thresh > STARTUP_RTT_MAX_THRESH else thresh
        if rtt >= self.min_rtt + thresh:
            self.filled_pipe = True

    def _check_full_pipe(self, sample: RateSample) -> None:
        if self.filled_pipe or sample.is_app_limited:
            return
        if self.btlbw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = self.btlbw
            self._full_bw_count = 0
            return
        self._full_bw_count += 1
        if self._full_bw_count >= FULL_BW_ROUNDS:
            self.filled_pipe = True

    # -- PROBE_BW and PROBE_RTT ---------------------------------------------------------------

    def _enter_probe_bw(self, now: float) -> None:
        self.state = BbrState.PROBE_BW
        self.cwnd_gain = PROBE_BW_CWND_GAIN
        # Start in a cruise phase: the drain that just ended was the probe-down already.
        self._cycle_index = 2
        self.pacing_gain = PROBE_BW_GAINS[self._cycle_index]
        self._cycle_stamp = now

    def _advance_cycle(self, sample: RateSample, now: float) -> None:
        elapsed = now - self._cycle_stamp
        rtt = self.min_rtt  # _path_rtt(), inlined: once per ACK in PROBE_BW
        if not math.isfinite(rtt):
            rtt = self.initial_rtt
        full_length = elapsed > rtt
        gain = self.pacing_gain
        if gain > 1.0:
            # Probe until the extra inflight is actually out there (or loss says it is too
            # much); give up waiting after a few RTTs if the window bounds it.
            reached = sample.prior_in_flight >= self.bdp(gain) or sample.newly_lost > 0
            advance = (full_length and reached) or elapsed > 3 * rtt
        elif gain < 1.0:
            advance = full_length or sample.bytes_in_flight <= self.bdp()
        else:
            advance = full_length
        if advance:
            self._cycle_index = (self._cycle_index + 1) % len(PROBE_BW_GAINS)
            self.pacing_gain = PROBE_BW_GAINS[self._cycle_index]
            self._cycle_stamp = now

    def _update_probe_rtt(
        self, sample: RateSample, now: float, min_rtt_expired: bool, round_start: bool
    ) -> None:
        if min_rtt_expired and self.state is not BbrState.PROBE_RTT and self.filled_pipe:
            self.state = BbrState.PROBE_RTT
            self.pacing_gain = 1.0
            self.cwnd_gain = 1.0
            self._probe_rtt_done_at = None
        if self.state is not BbrState.PROBE_RTT:
            return
        if self._probe_rtt_done_at is None:
            if sample.bytes_in_flight <= self._probe_rtt_cwnd():
                self._probe_rtt_done_at = now + max(PROBE_RTT_DURATION, self._path_rtt())
                self._probe_rtt_round = self.round_count + 1
            return
        if now >= self._probe_rtt_done_at and self.round_count >= self._probe_rtt_round:
            self._min_rtt_stamp = now
            self._enter_probe_bw(now)

    def _probe_rtt_cwnd(self) -> int:
        # Half a BDP rather than BBRv1's four packets: enough to drain a queue we built, without
        # emptying the pipe (a bulk transfer loses about 1 % of its time, not 2 %).
        return max(self._floor(), self.bdp(0.5))

    # -- outputs -------------------------------------------------------------------------------

    def _set_outputs(self) -> None:
        # Once per ACK, so send_bw, bdp() and _floor() are inlined and min()/max() written as
        # compares (each keeps the operand min() or max() would return).
        btlbw = self.btlbw
        filled = self.filled_pipe
        loss = self.loss_rate
        cap = MAX_LOSS_COMPENSATION
        loss = cap if cap < loss else loss
        send_bw = btlbw / (1.0 - loss)
        if btlbw > 0:
            if self._queue_free:
                rate = self.pacing_gain * send_bw
            else:
                # A queue to drain: btlbw alone idled the link by the loss rate once it had.
                least = (1.0 - QUEUE_DRAIN_MARGIN) * self._round_rate / (1.0 - loss)
                least = send_bw if send_bw < least else least
                rate = self.pacing_gain * (least if least > btlbw else btlbw)
            # Until the pipe is full, never slow down: early samples undershoot the path.
            if filled or rate > self.pacing_rate:
                self.pacing_rate = rate
        min_rtt = self.min_rtt
        if self.state is BbrState.PROBE_RTT:
            cwnd = self._probe_rtt_cwnd()
        else:
            if btlbw <= 0:
                cwnd = int(self.cwnd_gain * self.initial_cwnd)
            else:
                path_rtt = min_rtt if math.isfinite(min_rtt) else self.initial_rtt
                cwnd = int(self.cwnd_gain * send_bw * path_rtt)
                if btlbw > 0 and filled:
                    # Room for the ACK aggregation seen lately, up to BBR's 100 ms at btlbw.
                    extra = self.extra_acked
                    most = btlbw * EXTRA_ACKED_MAX_TIME
                    cwnd += int(most if most < extra else extra)
            if not filled:
                cwnd = self.cwnd if self.cwnd > cwnd else cwnd
                cwnd = self.initial_cwnd if self.initial_cwnd > cwnd else cwnd
        hi = self.inflight_hi
        if hi != _INF and int(hi) < cwnd:  # (inflight_hi is a finite number or inf)
            cwnd = int(hi)
        floor = self._short_floor if min_rtt < SHORT_RTT else self.min_cwnd
        self.cwnd = floor if floor > cwnd else cwnd
