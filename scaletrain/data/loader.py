"""Batches: `BatchLoader` draws training windows of one token stream in a seeded, resumable order that is the
same for any number of ranks; `MixtureLoader` draws each sequence's source by weight and its window from that
source's order; `eval_batches` is the fixed validation set.

The data order is global, a function of the seed alone: epoch e of a stream is a permutation of all its
windows drawn from `default_rng([seed, e])`, and the epochs follow each other. Each `next_batch` (on every
rank) consumes the next global micro-batch, `batch_size * world_size` windows (`batch_size` is this rank's
share), of that stream; rank r of W takes rows r, r + W, r + 2W, ... of it (strided: with W = 1 this is the
whole global micro-batch, in order). So the state is a global position, (epoch, windows of the epoch used),
and a run checkpointed on N ranks continues on M ranks with exactly the remaining samples, as long as the
global batch (train.batch_size, train.grad_accum), seq_len and seed stay (the trainer's config check refuses
changing those)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows tokens[s : s + seq_len + 1] for each start s, as int64 (x, y) with y = x shifted by one."""
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class WindowOrder:
    """The global order of one stream's non-overlapping windows of seq_len + 1 tokens (stride seq_len): epoch e
    is a permutation of all of them drawn from `default_rng([seed, e])`, epochs one after the other; `take(n)`
    hands out the next n. Its position (epoch, pos) does not depend on how many ranks read it."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int):
        self.n_tokens, self.seq_len, self.seed = n_tokens, seq_len, seed
        self.n_windows = (n_tokens - 1) // seq_len
        if self.n_windows <= 0:
            raise ValueError(f"{n_tokens} tokens hold no window of seq_len + 1 = {seq_len + 1}")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.empty(0, dtype=np.int64)  # the last epoch's goes before the next is drawn
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order *= self.seq_len  # in place: one permutation's memory
            self._order_epoch = self.epoch
        return self._order

    def take(self, n: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Start offsets of windows rank, rank + world_size, ... of the next `n` of the global order (all `n` with
        the defaults); advances the position by `n`. Memory: the result and one epoch's permutation, whatever `n`:
        a batch spanning many epochs fills the result epoch by epoch (each permutation is dropped when the next is
        drawn), and a rank holds only its own rows."""
        out = np.empty(len(range(rank, n, world_size)), dtype=np.int64)  # far beyond memory: refused here, at once
        done = filled = 0  # windows of the n consumed; rows of `out` written
        while done < n:  # a global batch may straddle one or more epoch boundaries
            k = min(n - done, self.n_windows - self.pos)
            first = self.pos + (rank - done) % world_size  # this rank's first row of the k
            m = len(range(first, self.pos + k, world_size))
            out[filled : filled + m] = self._starts()[first : self.pos + k : world_size]
            filled, done, self.pos = filled + m, done + k, self.pos + k
            if self.pos == self.n_windows:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Also reads the per-rank state_dict of scaletrain before global positions (it has `world_size`): W ranks at
        per-rank position p had together used the first p * W windows of the epoch's permutation (they dropped
        the last n_windows % W of each epoch; this order does not, so from the end of that epoch on the order
        is this version's)."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "n_tokens"):
            if state_dict[key] != mine[key]:
                raise ValueError(
                    f"loader state_dict was saved with {key}={state_dict[key]}, this loader has "
                    f"{key}={mine[key]}; the data order would not continue where it stopped"
                )
        self.epoch, self.pos = state_dict["epoch"], state_dict["pos"] * state_dict.get("world_size", 1)


def _check_rank(rank: int, world_size: int, pin_memory: bool) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..world_size-1 = {world_size - 1}")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (page-locked memory is for host-to-GPU copies)")


class BatchLoader:
    """This rank's rows of each global micro-batch of one stream's `WindowOrder` (see the module docstring):
    deterministic in (seed, epoch), the same global batches on any number of ranks, and resumable:
    `state_dict()` (the global position) pins the exact next global batch."""

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
        _check_rank(rank, world_size, pin_memory)
        # pinned batches let `.to("cuda", non_blocking=True)` return at once: the copy and the next batch's
        # gather overlap the GPU's work on the current step (outside log steps the loop syncs once per step, for the
        # NaN/Inf guard, after the backward: trainer.py's docstring lists the syncs)
        self.pin_memory = pin_memory
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.order = WindowOrder(len(tokens), seq_len, seed)

    @property
    def epoch(self) -> int:
        return self.order.epoch

    @property
    def pos(self) -> int:
        """Windows of the current epoch's global order used so far (by all ranks together)."""
        return self.order.pos

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # every rank advances through the whole global micro-batch and keeps (and gathers) only its rows
        starts = self.order.take(self.batch_size * self.world_size, self.rank, self.world_size)
        x, y = _windows(self.tokens, starts, self.seq_len)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.order.load_state_dict(state_dict)


class MixtureLoader:
    """Sequences from several token streams, each row's source drawn by weight. Global micro-batch b's sources
    come from `default_rng([seed, MIX, b])`, one draw per row of the GLOBAL micro-batch, and the rows of source
    i take, in row order, the next windows of that source's own `WindowOrder` (seed * 1,000,003 + i); rank r
    takes rows r::world_size as `BatchLoader` does. So which source and which window a sample gets depends on
    its global index alone, never on the rank count; the state is the batch counter and each source's global
    position. Over n rows a source's share is Binomial(n, w) / n: it converges to its weight, with standard
    deviation sqrt(w (1 - w) / n)."""

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
        _check_rank(rank, world_size, pin_memory)
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.orders = [WindowOrder(len(tokens), seq_len, seed * 1_000_003 + i) for i, tokens in enumerate(streams)]
        self.streams, self.batch_size, self.seq_len, self.seed = streams, batch_size, seq_len, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.batch = 0

    def sources_of_batch(self, batch: int) -> np.ndarray:
        """The source index of every row of global micro-batch `batch` (all ranks' rows)."""
        rng = np.random.default_rng([self.seed, self.MIX, batch])
        return rng.choice(len(self.weights), size=self.batch_size * self.world_size, p=self.weights)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        which = self.sources_of_batch(self.batch)
        self.batch += 1
        starts = np.empty(len(which), dtype=np.int64)
        for i, order in enumerate(self.orders):  # every rank advances every source by the global batch's rows
            rows = np.flatnonzero(which == i)
            if len(rows):
                starts[rows] = order.take(len(rows))
        which, starts = which[self.rank :: self.world_size], starts[self.rank :: self.world_size]
        x = torch.empty(self.batch_size, self.seq_len, dtype=torch.int64)
        y = torch.empty_like(x)
        for i in range(len(self.orders)):
            rows = np.flatnonzero(which == i)
            if len(rows):
                x[rows], y[rows] = _windows(self.streams[i], starts[rows], self.seq_len)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def state_dict(self) -> dict:
        return {
            "batch": self.batch,
            "weights": self.weights.tolist(),
            "sources": [order.state_dict() for order in self.orders],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "sources" not in state_dict or len(state_dict["sources"]) != len(self.orders):
            raise ValueError(
                f"loader state_dict was saved with {len(state_dict.get('sources', [None]))} source(s), this loader has "
                f"{len(self.orders)}; the data order would not continue where it stopped"
            )
        if not np.allclose(state_dict["weights"], self.weights, rtol=0, atol=1e-12):
            raise ValueError(
                f"loader state_dict was saved with source weights {state_dict['weights']}, this loader has "
                f"{self.weights.tolist()}; the data order would not continue where it stopped"
            )
        ranks = max(sub.get("world_size", 1) for sub in state_dict["sources"])
        if ranks > 1:
            raise ValueError(
                f"this mixture's loader state_dict was saved on {ranks} ranks by a scaletrain older than global data "
                "positions: each source's position was kept per rank and only rank 0's was saved, so its data "
                "order cannot be continued; start a new run folder (or resume with the version that wrote it)"
            )
        for order, sub in zip(self.orders, state_dict["sources"]):
            order.load_state_dict(sub)
        self.batch = state_dict["batch"]


def _eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> int:
    n = min(n_batches * batch_size, (len(tokens) - 1) // seq_len)
    if n <= 0:
        raise ValueError(f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1}")
    return n


def eval_batch_count(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> int:
    """How many batches `eval_batches` yields for the same arguments."""
    return -(-_eval_windows(tokens, batch_size, seq_len, n_batches) // batch_size)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches * batch_size non-overlapping windows, in order (fewer if the split is
    short; the last batch may then be smaller). The same set on every call."""
    n = _eval_windows(tokens, batch_size, seq_len, n_batches)
    for first in range(0, n, batch_size):
        yield _windows(tokens, np.arange(first, min(first + batch_size, n)) * seq_len, seq_len)
