"""Packed, shuffled, resumable training samples.

The token stream (documents joined with EOS) is cut into samples of `seq_len + 1` tokens
(consecutive samples share one boundary token, so every token is a target once). Samples are visited
in a seeded random order per epoch; global batch `n` takes the next `batch_size * dp_size` samples
and data-parallel rank `r` the `r`-th slice of it. The order is a pure function of
(seed, epoch), so the state is just the number of batches consumed.
"""

import torch


class PackedSampler:
    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        self.tokens = tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.num_samples = (len(tokens) - 1) // seq_len
        per_step = batch_size * dp_size
        if self.num_samples < per_step:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens: {self.num_samples} samples of {seq_len + 1} tokens, "
                f"fewer than one global batch ({batch_size} x {dp_size} ranks); use a larger corpus, a "
                "shorter data.seq_len or a smaller train.batch_size"
            )
        self.batches_per_epoch = self.num_samples // per_step
        self.consumed = 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_samples, generator=gen)
            self._order_epoch = epoch
        return self._order

    def sample_ids(self, batch_index: int) -> torch.Tensor:
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        per_step = self.batch_size * self.dp_size
        start = within * per_step + self.dp_rank * self.batch_size
        return self._epoch_order(epoch)[start : start + self.batch_size]

    def get_batch(self, batch_index: int) -> torch.Tensor:
        """`[batch_size, seq_len + 1]` int64 tokens of global batch `batch_index` for this rank."""
        rows = [
            self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1]
            for i in self.sample_ids(batch_index)
        ]
        return torch.stack(rows).long()

    def next_batch(self) -> torch.Tensor:
        batch = self.get_batch(self.consumed)
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"the data loader state was saved for {state['num_samples']} samples with seed "
                f"{state['seed']}, but this run has {self.num_samples} with seed {self.seed}; resume with "
                "the same data and data.seq_len, or start fresh with train.resume=none"
            )
        self.consumed = int(state["consumed"])
