"""A deterministic, resumable, multi-host batch iterator over a dict of numpy arrays."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPosition:
    """The next batch an iterator gives: its epoch, and its index within that epoch.

    Save it with a checkpoint (`dataclasses.asdict`) and pass it back to resume exactly.
    """

    epoch: int = 0
    index: int = 0


class BatchIterator:
    """Endless fixed-size batches: a seeded shuffle per epoch, the ragged tail dropped.

    Epoch e visits rows in the order `default_rng([seed, e]).permutation(rows)`, so the
    batches depend only on (seed, position) and a resumed run sees the same ones. `batch_size`
    is the global batch; with several processes each gets its contiguous
    `batch_size // process_count` rows of every global batch.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        position: BatchPosition = BatchPosition(),
    ):
        if not arrays:
            raise ValueError("no arrays to batch")
        sizes = {name: len(array) for name, array in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays have different numbers of rows: {sizes}")
        self.rows = next(iter(sizes.values()))
        if not 0 < batch_size <= self.rows:
            raise ValueError(f"batch_size {batch_size} must be between 1 and the {self.rows} rows")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        self.arrays = arrays
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.local_batch_size = batch_size // process_count
        self.local_offset = process_index * self.local_batch_size
        self.batches_per_epoch = self.rows // batch_size
        if not 0 <= position.index < self.batches_per_epoch:
            raise ValueError(f"{position} is outside an epoch of {self.batches_per_epoch} batches")
        self.position = position
        self._order_epoch, self._order = -1, np.arange(self.rows)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`, computed once per epoch."""
        if self.shuffle and epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return self._order

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch; advances `position`."""
        epoch, index = self.position.epoch, self.position.index
        start = index * self.batch_size + self.local_offset
        rows = self._epoch_order(epoch)[start : start + self.local_batch_size]
        if index + 1 == self.batches_per_epoch:
            self.position = BatchPosition(epoch + 1, 0)
        else:
            self.position = BatchPosition(epoch, index + 1)
        return {name: array[rows] for name, array in self.arrays.items()}
