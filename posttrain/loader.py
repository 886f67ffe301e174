"""Batches from token examples: shuffling by seed and epoch, packing or padding, rank shards, exact resume.

    loader = DataLoader(examples, batch_size=4, max_seq_len=1024, pad_id=tok.pad_id, seed=0,
                        rank=rank, world_size=world)
    batch = next(loader)              # Batch: ids, targets, loss_mask, positions, segments (B, T)
    saved = loader.state_dict()       # {"epoch", "index", "config"}: into the checkpoint
    loader.load_state_dict(saved)     # a resumed run gets exactly the batches that were still to come

Per epoch, every rank computes the same global list of batches:
1. `epoch_order(n, seed, epoch)`: a permutation of the examples, fixed by (seed, epoch).
2. Rows: packing=True fills rows of max_seq_len tokens greedily, first fit, in that order;
   packing=False makes one example a row and pads each batch to its longest row.
3. Batches: consecutive groups of `batch_size` rows.
4. Sharding: rank r takes global batches r, r + W, r + 2W, ... The stream of global batches does not
   depend on W, so W ranks x G accumulation steps see the same micro-batches as 1 rank x W*G.
   drop_last=True (training): every rank takes floor(N / W) batches; a final partial batch and the
   last N mod W batches are dropped this epoch (the next epoch's shuffle drops others).
   drop_last=False (evaluation): the partial batch is filled with empty rows and every rank takes
   ceil(N / W), missing ones being all-padding batches with no loss tokens: each example is seen once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .errors import UserError

# An example is any (ids, loss_mask) pair, e.g. data.Example: loss_mask[i] says ids[i] is a target.
ExampleLike = tuple[list[int], list[bool]]

IGNORE = -100  # target of positions that get no loss (torch's cross_entropy ignore_index)


class Batch(NamedTuple):
    """A training batch; every tensor is (B, T), T = max_seq_len when packed, else the longest row.

    ids: token ids, pad_id in padding.
    targets: the next token within the same document where it is a training target, else IGNORE.
        A document's last position is always IGNORE: it never predicts the next document.
    loss_mask: targets != IGNORE, i.e. the positions whose prediction is trained.
    positions: RoPE positions, restarting at 0 for each document (and for the padding run).
    segments: document number 1, 2, ... within the row, 0 for padding; attention stays within a segment.
    index: the example indices packed in each row, in segment order (e.g. to find cached teacher targets).
    pixel_values: (N, 3, H, W) the images of the batch's examples, row by row, in the order of their image
        blocks (what the model's forward takes); None when no example has images.
    """

    ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    index: list[list[int]]
    pixel_values: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "Batch":
        moved = {k: getattr(self, k).to(device, non_blocking=True)
                 for k in ("ids", "targets", "loss_mask", "positions", "segments")}
        if self.pixel_values is not None:
            moved["pixel_values"] = self.pixel_values.to(device, non_blocking=True)
        return self._replace(**moved)

    @property
    def images(self) -> dict:
        """The model's image keyword arguments for this batch ({} without images)."""
        return {} if self.pixel_values is None else {"pixel_values": self.pixel_values}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) fixed by (seed, epoch): every rank and every resume computes the same one."""
    # SeedSequence mixes the pair, so (seed, epoch + 1) is unrelated to (seed + 1, epoch).
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n).tolist()


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first fit: each item (in order) goes into the first row with room for it, else a new row.

    Returns rows as lists of item indices. O(n log n): a max-tree over the room left in each row;
    rows not opened yet have full room, so the leftmost fit is an open row or the next new one.
    """
    size = 1
    while size < len(lengths):
        size *= 2
    room = [capacity] * (2 * size)  # room[1] is the root; leaves size..2*size-1 are rows
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        assert 0 < n <= capacity, f"item {i} has length {n}, outside 1..{capacity}"
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        if node - size == len(rows):
            rows.append([])
        rows[node - size].append(i)
        room[node] -= n
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return rows


def collate(examples: Sequence[ExampleLike], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> Batch:
    """Lay out rows of examples (lists of example indices) as a Batch of width seq_len."""
    cols: dict[str, list[list[int]]] = {"ids": [], "targets": [], "positions": [], "segments": []}
    pixels = []
    for row in rows:
        ids, targets, positions, segments = [], [], [], []
        for segment, i in enumerate(row, 1):
            x, mask = examples[i][0], examples[i][1]
            if (p := getattr(examples[i], "pixel_values", None)) is not None:
                pixels.append(p)
            ids += x
            # Position t predicts x[t + 1]; the last one has nothing in its own document to predict.
            targets += [t if keep else IGNORE for t, keep in zip(x[1:], mask[1:])] + [IGNORE]
            positions += range(len(x))
            segments += [segment] * len(x)
        pad = seq_len - len(ids)
        assert pad >= 0, f"row {row} has {len(ids)} tokens, more than {seq_len}"
        ids += [pad_id] * pad
        targets += [IGNORE] * pad
        positions += range(pad)
        segments += [0] * pad
        for k, v in zip(cols, (ids, targets, positions, segments)):
            cols[k].append(v)
    t = {k: torch.tensor(v, dtype=torch.long).reshape(len(rows), seq_len) for k, v in cols.items()}
    return Batch(t["ids"], t["targets"], t["targets"] != IGNORE, t["positions"], t["segments"],
                 [list(r) for r in rows], torch.cat(pixels) if pixels else None)


class DataLoaderState(NamedTuple):
    """Where a loader is: the next batch is this rank's batch `index` of epoch `epoch`.

    All ranks take the same number of batches per epoch, so they are always at the same state.
    """

    epoch: int
    index: int


class DataLoader:
    """An iterator of this rank's batches over `epochs` epochs (None: forever), resumable by state_dict."""

    def __init__(self, examples: Sequence[ExampleLike], *, batch_size: int, max_seq_len: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True, packing: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, epochs: int | None = None):
        assert 0 <= rank < world_size, f"rank {rank} outside world of {world_size}"
        assert batch_size >= 1 and seed >= 0, f"batch_size {batch_size} and seed {seed} must be >= 1 and >= 0"
        self.examples, self.batch_size, self.max_seq_len, self.pad_id = examples, batch_size, max_seq_len, pad_id
        self.seed, self.shuffle, self.packing, self.drop_last = seed, shuffle, packing, drop_last
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.state = DataLoaderState(0, 0)
        self._plan: tuple[int, list[list[list[int]]]] | None = None
        if not self.plan(0):
            rows = len(self._rows(0))
            raise UserError(
                f"{len(examples)} examples make {rows} {'packed ' if packing else ''}rows, fewer than the "
                f"{batch_size * world_size} (micro_batch_size {batch_size} x {world_size} ranks) needed for one "
                "full batch per rank (fix: lower data.micro_batch_size or use more data)")

    def _rows(self, epoch: int) -> list[list[int]]:
        n = len(self.examples)
        order = epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))
        if not self.packing:
            return [[i] for i in order]
        return [[order[j] for j in row]
                for row in pack([len(self.examples[i][0]) for i in order], self.max_seq_len)]

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """This rank's batches of `epoch`, each a list of rows, each a list of example indices."""
        if self._plan is None or self._plan[0] != epoch:
            rows, B, W = self._rows(epoch), self.batch_size, self.world_size
            batches = [rows[k:k + B] for k in range(0, len(rows), B)]
            if self.drop_last:
                if batches and len(batches[-1]) < B:
                    batches.pop()
                count = len(batches) // W
            else:
                count = -(-len(batches) // W)
            mine = [b + [[]] * (B - len(b)) for b in batches[self.rank::W][:count]]
            self._plan = (epoch, mine + [[[]] * B] * (count - len(mine)))
        return self._plan[1]

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> Batch:
        epoch, index = self.state
        while self.epochs is None or epoch < self.epochs:
            if index < len(self.plan(epoch)):
                break
            epoch, index = epoch + 1, 0
        else:
            raise StopIteration
        rows = self.plan(epoch)[index]
        width = self.max_seq_len if self.packing else max(1, *(sum(len(self.examples[i][0]) for i in r)
                                                               for r in rows))
        self.state = DataLoaderState(epoch, index + 1)
        return collate(self.examples, rows, width, self.pad_id)

    # ----- checkpointing

    def _config(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"examples": len(self.examples), "tokens": sum(len(e[0]) for e in self.examples),
                "seed": self.seed, "shuffle": self.shuffle, "packing": self.packing,
                "batch_size": self.batch_size, "max_seq_len": self.max_seq_len,
                "world_size": self.world_size, "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "index": self.state.index, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        now = self._config()
        if diff := [f"{k} {state['config'].get(k)} -> {v}" for k, v in now.items() if state["config"].get(k) != v]:
            raise UserError(f"the data position saved in the checkpoint does not fit this run ({'; '.join(diff)}), "
                            "so resuming would not see the same batches (fix: resume with the same data, seed, "
                            "batch size, sequence length and number of ranks, or start a fresh run)")
        self.state = DataLoaderState(int(state["epoch"]), int(state["index"]))


__all__ = ["IGNORE", "Batch", "DataLoader", "DataLoaderState", "collate", "epoch_order", "pack"]
