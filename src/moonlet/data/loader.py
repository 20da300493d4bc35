"""Batches for training: packed fixed-length rows, deterministic from a seed, resumable, rank-sharded.

Two row sources share one batching/state machine (`RowLoader`):
- `PackedTextLoader`: documents tokenised as [bos] doc [eos] and concatenated into one stream; an
  epoch cuts it into windows of seq_len + 1 tokens (at an offset drawn per epoch) in a seeded
  random order. Attention may cross a document boundary inside a window (GPT-style packing), but
  no loss target does (below).
- `ChatLoader`: whole conversations (encoded with the chat template) packed greedily into rows in a
  seeded order per epoch, padded; a conversation longer than a row is truncated, never split. The
  loss mask covers exactly the assistant's tokens (`Tokenizer.encode_chat`).

Targets: position i of a row predicts token i+1 (main head) and token i+k+1 (MTP depth k) only
when that token belongs to the same document as token i and carries loss; otherwise the target is
IGNORE_INDEX. So neither the main nor the MTP targets ever cross a document boundary.

Sharding: step s takes global rows [s*B*W, (s+1)*B*W) of the epoch order; rank r keeps its B.
The state ({epoch, index}) is the same on every rank, so a resumed run (any rank count that divides
the global batch the same way) sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, target of position i (IGNORE_INDEX: no loss)
    mtp_labels: list[torch.Tensor]  # depth k (1-based) at [k-1]: [B, T] target token i+k+1
    n_loss_tokens: int  # positions with a main-head target

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), [m.to(device) for m in self.mtp_labels],
                     self.n_loss_tokens)


def make_targets(tokens_BL: np.ndarray, doc_BL: np.ndarray, loss_BL: np.ndarray, mtp_depth: int) -> Batch:
    """Rows of L = T + 1 tokens with their document ids and loss mask -> a Batch with T inputs.

    Target of position i at depth k (k = 0: main head) is token j = i + 1 + k when j < L,
    doc[j] == doc[i] and loss[j]; else IGNORE_INDEX."""
    B, L = tokens_BL.shape
    T = L - 1
    tokens = torch.from_numpy(tokens_BL.astype(np.int64))
    targets = []
    for k in range(mtp_depth + 1):
        j = 1 + k
        t = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
        if j < L:
            n = L - j  # positions i in [0, n) have j-th neighbour inside the row
            ok = (doc_BL[:, j:] == doc_BL[:, :n]) & loss_BL[:, j:]
            t[:, :n] = torch.where(torch.from_numpy(ok), tokens[:, j:], IGNORE_INDEX)
        targets.append(t)
    labels = targets[0]
    return Batch(tokens[:, :T].contiguous(), labels, targets[1:], int((labels != IGNORE_INDEX).sum()))


class RowLoader:
    """Seeded epochs of rows -> batches; subclasses define the rows of an epoch."""

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mtp_depth: int = 0, shuffle: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.mtp_depth, self.shuffle = rank, world_size, mtp_depth, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    # subclass interface
    def num_rows(self, epoch: int) -> int:
        raise NotImplementedError

    def rows(self, epoch: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [n, T+1], doc ids [n, T+1], loss mask [n, T+1] bool) of the epoch's rows idx."""
        raise NotImplementedError

    # batching
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.num_rows(epoch)
            if n < self.global_batch:
                raise ValueError(f"the data gives only {n} rows of {self.seq_len + 1} tokens, fewer than one global "
                                 f"batch ({self.global_batch}); use more data or a smaller --batch-size/--seq-len")
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> Batch:
        order = self._epoch_order(self.epoch)
        if self.index + self.global_batch > len(order):  # drop the ragged tail, start the next epoch
            self.epoch, self.index = self.epoch + 1, 0
            order = self._epoch_order(self.epoch)
        start = self.index + self.rank * self.batch_size
        idx = order[start:start + self.batch_size]
        self.index += self.global_batch
        return make_targets(*self.rows(self.epoch, idx), self.mtp_depth)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def steps_per_epoch(self) -> int:
        return self.num_rows(0) // self.global_batch

    def eval_batches(self, max_batches: int | None = None):
        """Epoch-0 rows in storage order (no shuffle), this rank's share; does not touch the state."""
        n = self.num_rows(0)
        n_batches = n // self.global_batch if max_batches is None else min(max_batches, n // self.global_batch)
        if n_batches == 0 and n > self.rank:  # a small validation set: one partial batch
            idx = np.arange(self.rank, n, self.world_size)[: self.batch_size]
            yield make_targets(*self.rows(0, idx), self.mtp_depth)
            return
        for b in range(n_batches):
            start = b * self.global_batch + self.rank * self.batch_size
            yield make_targets(*self.rows(0, np.arange(start, start + self.batch_size)), self.mtp_depth)

    # resumable state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "global_batch": self.global_batch,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "seq_len"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"cannot resume the data order: the checkpoint's loader had {key}={state[key]}, "
                                 f"this run has {getattr(self, key)}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ---- pretraining text ---------------------------------------------------------------------------------
@dataclass
class TokenStream:
    """A split's documents as one stream: tokens [N] and the start offset of each document [D]."""

    tokens: np.ndarray
    doc_starts: np.ndarray

    @classmethod
    def from_documents(cls, tokenizer, docs: list[str]) -> "TokenStream":
        encoded = tokenizer.encode_batch(docs)
        pre = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        post = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        lengths = np.array([len(pre) + len(e) + len(post) for e in encoded], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=np.int32)
        pos = 0
        for e in encoded:
            row = pre + e + post
            tokens[pos:pos + len(row)] = row
            pos += len(row)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        return cls(tokens, starts)

    def save(self, path) -> None:
        np.savez(path, tokens=self.tokens, doc_starts=self.doc_starts)

    @classmethod
    def load(cls, path) -> "TokenStream":
        with np.load(path) as f:
            return cls(f["tokens"], f["doc_starts"])

    def doc_ids(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    def __len__(self) -> int:
        return len(self.tokens)


class PackedTextLoader(RowLoader):
    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, **kw):
        super().__init__(batch_size, seq_len, **kw)
        self.stream = stream

    def _offset(self, epoch: int) -> int:
        """Epoch 0 starts at token 0; later epochs shift the window grid so rows differ between epochs."""
        if epoch == 0 or not self.shuffle:
            return 0
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len))

    def num_rows(self, epoch: int) -> int:
        return max(0, (len(self.stream) - 1 - self._offset(epoch)) // self.seq_len)

    def rows(self, epoch, idx):
        L = self.seq_len + 1
        pos = self._offset(epoch) + np.asarray(idx, dtype=np.int64)[:, None] * self.seq_len + np.arange(L)[None, :]
        return self.stream.tokens[pos], self.stream.doc_ids(pos), np.ones(pos.shape, dtype=bool)


# ---- chat (SFT) -----------------------------------------------------------------------------------------
class ChatLoader(RowLoader):
    def __init__(self, conversations: list[tuple[list[int], list[bool]]], pad_id: int, batch_size: int,
                 seq_len: int, **kw):
        super().__init__(batch_size, seq_len, **kw)
        if not conversations:
            raise ValueError("no conversations to train on")
        L = seq_len + 1
        self.convs = [(np.asarray(ids[:L], dtype=np.int32), np.asarray(mask[:L], dtype=bool)) for ids, mask in conversations]
        self.pad_id = pad_id
        self._packed_epoch, self._packed = None, None

    def _pack(self, epoch: int) -> list[list[int]]:
        """Conversation indices per row: the epoch's order, greedily filled (first fit in order)."""
        if self._packed_epoch != epoch:
            n = len(self.convs)
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(n) if self.shuffle else np.arange(n)
            L = self.seq_len + 1
            rows, cur, used = [], [], 0
            for c in order.tolist():
                size = len(self.convs[c][0])
                if used + size > L and cur:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(c)
                used += size
            if cur:
                rows.append(cur)
            self._packed, self._packed_epoch = rows, epoch
        return self._packed

    def num_rows(self, epoch: int) -> int:
        return len(self._pack(epoch))

    def rows(self, epoch, idx):
        packed = self._pack(epoch)
        L = self.seq_len + 1
        n = len(idx)
        tokens = np.full((n, L), self.pad_id, dtype=np.int32)
        docs = np.full((n, L), -1, dtype=np.int64)
        loss = np.zeros((n, L), dtype=bool)
        for r, i in enumerate(np.asarray(idx).tolist()):
            pos = 0
            for c in packed[i]:
                ids, mask = self.convs[c]
                tokens[r, pos:pos + len(ids)] = ids
                docs[r, pos:pos + len(ids)] = c
                loss[r, pos:pos + len(ids)] = mask
                pos += len(ids)
        return tokens, docs, loss

    @property
    def assistant_fraction(self) -> float:
        return float(sum(m.sum() for _, m in self.convs) / max(1, sum(len(m) for _, m in self.convs)))
