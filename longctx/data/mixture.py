"""Length mixtures: every step trains one sequence length, the lengths interleaved so that each keeps
its share of the samples over every window of steps (`data.seq_len_mix`, or a mixture stage of
`data.seq_len_schedule`).

    schedule = LengthSchedule([(256, 0.3), (512, 0.7)], seed=0)
    schedule.length_at(step)          # the length step `step` of the stage trains
    sampler = MixedSampler({256: s256, 512: s512}, schedule, steps_per_batch=grad_accum)
    batch = sampler.next_batch()      # a PackedBatch of the step's length

The schedule is deficit round robin: step `n` takes the length that is furthest behind its share
(`(n + 1) * share - count so far`). Every length's count after `n` steps is then within one of
`n * share`, so over any window of `w` steps a length gets `w * share` steps give or take two. The seed
picks the stage's starting point in that sequence (a window of it is still a window) and breaks ties.
Each length has its own `PackedSampler`; the samples a step reads
depend only on the step (how many earlier steps took its length), so a resumed run reads exactly what
the uninterrupted one did.
"""

import numpy as np

from longctx.data.sampler import PackedBatch, PackedSampler, check_same_state

_SCHEDULE_KEY = 3
_MAX_OFFSET = 1000


class LengthSchedule:
    def __init__(self, mix: list[tuple[int, float]], seed: int):
        if not mix or abs(sum(share for _, share in mix) - 1.0) > 1e-6:
            raise ValueError(f"a length mixture needs shares that sum to 1, got {mix}")
        self.mix = [(int(n), float(share)) for n, share in mix]
        self.lengths = [n for n, _ in self.mix]
        self.shares = np.array([share for _, share in self.mix])
        # The seed picks where in the (otherwise fixed) sequence the stage starts, and the order ties
        # are broken in.
        rng = np.random.default_rng([seed & (2**64 - 1), _SCHEDULE_KEY])
        self._tiebreak = -rng.permutation(len(mix)) * 1e-9
        self._offset = int(rng.integers(0, _MAX_OFFSET))
        # Per step: the length index it takes and how many earlier steps took that length.
        self._choices: list[int] = []
        self._before: list[int] = []
        self._counts = np.zeros(len(mix), dtype=np.int64)
        self._extend(self._offset)
        self._at_offset = self._counts.copy()

    def _extend(self, steps: int) -> None:
        while len(self._choices) < steps:
            n = len(self._choices)
            deficit = (n + 1) * self.shares - self._counts + self._tiebreak
            i = int(np.argmax(deficit))
            self._choices.append(i)
            self._before.append(int(self._counts[i]))
            self._counts[i] += 1

    def length_at(self, step: int) -> int:
        """The length step `step` (from 0, within the stage) trains."""
        return self.slot(step)[0]

    def slot(self, step: int) -> tuple[int, int]:
        """`(length, k)`: step `step` trains `length`, and is the `k`-th step (from 0) to do so."""
        at = self._offset + step
        self._extend(at + 1)
        i = self._choices[at]
        return self.lengths[i], self._before[at] - int(self._at_offset[i])


class MixedSampler:
    """The batches of a mixture stage: one length per step (`LengthSchedule`), `steps_per_batch`
    batches per step (the gradient-accumulation micro-batches), each length's batches taken in turn
    from its own sampler. Quacks like `PackedSampler` for the trainer: `position` counts samples of
    the stage, `next_batch`, `global_batch`, `state_dict`."""

    def __init__(
        self, samplers: dict[int, PackedSampler], schedule: LengthSchedule, steps_per_batch: int = 1
    ):
        if sorted(samplers) != sorted(schedule.lengths):
            raise ValueError(f"samplers for lengths {sorted(samplers)} but a mixture of {schedule.lengths}")
        self.samplers, self.schedule = samplers, schedule
        self.mix = schedule.mix
        self.steps_per_batch = steps_per_batch
        self.global_batch = next(iter(samplers.values())).global_batch
        self.position = 0

    @property
    def per_step(self) -> int:
        return self.global_batch * self.steps_per_batch

    @property
    def seq_len(self) -> int:
        """The length the next batch has."""
        return self.schedule.length_at(self.position // self.per_step)

    def batch_at(self, position: int) -> PackedBatch:
        step, within = divmod(position, self.per_step)
        length, k = self.schedule.slot(step)
        return self.samplers[length].batch_at(k * self.per_step + within)

    def next_batch(self) -> PackedBatch:
        batch = self.batch_at(self.position)
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict:
        first = next(iter(self.samplers.values())).state_dict()
        same = {k: v for k, v in first.items() if k not in ("position", "seq_len")}
        return {**same, "position": self.position, "seq_len_mix": [list(m) for m in self.mix]}

    def load_state_dict(self, state: dict) -> None:
        check_same_state(state, self.state_dict(), "data.seq_len_mix, train.seed and passkey settings")
        self.position = int(state["position"])
