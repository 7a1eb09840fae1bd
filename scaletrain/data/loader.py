"""Batches: `BatchLoader` draws training windows of one token stream in a seeded, resumable, rank-sharded order;
`MixtureLoader` draws each sequence's source by weight and its window from that source's `BatchLoader`;
`eval_batches` is the fixed validation set."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows tokens[s : s + seq_len + 1] for each start s, as int64 (x, y) with y = x shifted by one."""
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class BatchLoader:
    """Random non-overlapping windows of seq_len + 1 tokens (stride seq_len), deterministic in
    (seed, epoch), sharded by rank, and resumable: `state_dict()` pins the exact next batch.

    Each epoch permutes all windows with `default_rng([seed, epoch])`; rank r takes every
    world_size-th window of that order. The last `n_windows % world_size` windows of the order are
    dropped so that every rank has equally many per epoch (ranks stay in step across epochs).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 = {world_size - 1}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("BatchLoader(pin_memory=True) needs CUDA (page-locked memory is for host-to-GPU copies)")
        # pinned batches let `.to("cuda", non_blocking=True)` return at once: the copy and the next batch's
        # gather overlap the GPU's work on the current step (the loop never syncs outside log steps)
        self.pin_memory = pin_memory
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        self.per_rank = self.n_windows // world_size
        if self.per_rank == 0:
            raise ValueError(
                f"{len(tokens)} tokens hold {self.n_windows} windows of seq_len + 1 = {seq_len + 1}; "
                f"need at least world_size = {world_size}"
            )
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _rank_starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order = perm[: self.per_rank * self.world_size][self.rank :: self.world_size] * self.seq_len
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _windows(self.tokens, self.next_starts(self.batch_size), self.seq_len)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def next_starts(self, n: int) -> np.ndarray:
        """Start offsets of this rank's next `n` windows (advances the position)."""
        parts = [np.empty(0, dtype=np.int64)]
        need = n
        while need:  # a batch may straddle one or more epoch boundaries
            take = min(need, self.per_rank - self.pos)
            parts.append(self._rank_starts()[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "world_size", "n_tokens"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has "
                    f"{key}={mine[key]}; the data order would not continue where it stopped"
                )
        self.epoch, self.pos = state["epoch"], state["pos"]


class MixtureLoader:
    """Sequences from several token streams, each row's source drawn by weight. Batch b's sources come from
    `default_rng([seed, MIX, b])` over the GLOBAL batch (every rank draws the same assignment and takes its
    rows), and each source's windows from its own `BatchLoader` (seed * 1,000,003 + i for source i, sharded by rank),
    so the data order is deterministic, rank-sharded and resumable like `BatchLoader`'s: the state is the batch
    counter and each source's position. Over n rows a source's share is Binomial(n, w) / n: it converges to
    its weight, with standard deviation sqrt(w (1 - w) / n)."""

    MIX = 0x6D6978  # "mix": keeps the assignment stream apart from the sources' window orders

    def __init__(
        self,
        streams: list[np.ndarray],
        weights: list[float],
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if len(streams) != len(weights) or not streams:
            raise ValueError("MixtureLoader needs one weight per stream, and at least one stream")
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.loaders = [
            BatchLoader(tokens, batch_size, seq_len, seed * 1_000_003 + i, rank, world_size)
            for i, tokens in enumerate(streams)
        ]
        self.streams, self.batch_size, self.seq_len, self.seed = streams, batch_size, seq_len, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.batch = 0

    def sources_of_batch(self, batch: int) -> np.ndarray:
        """The source index of each of this rank's rows in batch `batch`."""
        rng = np.random.default_rng([self.seed, self.MIX, batch])
        rows = rng.choice(len(self.weights), size=self.batch_size * self.world_size, p=self.weights)
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        which = self.sources_of_batch(self.batch)
        self.batch += 1
        x = torch.empty(self.batch_size, self.seq_len, dtype=torch.int64)
        y = torch.empty_like(x)
        for i, loader in enumerate(self.loaders):
            rows = np.flatnonzero(which == i)
            if len(rows):
                x[rows], y[rows] = _windows(self.streams[i], loader.next_starts(len(rows)), self.seq_len)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def state_dict(self) -> dict:
        return {
            "batch": self.batch,
            "weights": self.weights.tolist(),
            "sources": [l.state_dict() for l in self.loaders],
        }

    def load_state_dict(self, state: dict) -> None:
        if "sources" not in state or len(state["sources"]) != len(self.loaders):
            raise ValueError(
                f"loader state was saved with {len(state.get('sources', [None]))} source(s), this loader has "
                f"{len(self.loaders)}; the data order would not continue where it stopped"
            )
        if not np.allclose(state["weights"], self.weights, rtol=0, atol=1e-12):
            raise ValueError(
                f"loader state was saved with source weights {state['weights']}, this loader has "
                f"{self.weights.tolist()}; the data order would not continue where it stopped"
            )
        for loader, sub in zip(self.loaders, state["sources"]):
            loader.load_state_dict(sub)
        self.batch = state["batch"]


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches * batch_size non-overlapping windows, in order (fewer if the split is
    short; the last batch may then be smaller). The same set on every call."""
    n = min(n_batches * batch_size, (len(tokens) - 1) // seq_len)
    if n <= 0:
        raise ValueError(f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1}")
    for first in range(0, n, batch_size):
        yield _windows(tokens, np.arange(first, min(first + batch_size, n)) * seq_len, seq_len)
