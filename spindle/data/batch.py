"""The one batch type, from every loader (tokenized, text, streaming, SFT, validation) to every step executor.

A `Batch` is one micro-batch of `B` rows of `L` tokens, row-local: documents never cross a row, so a
row's documents are given by its own `position_ids`, which restart at 0 where a document (or the
fragment of one, or a row) starts. Nothing else describes them: attention derives the layout from
the positions on the device (spindle.model.attention.document_layout), context parallelism from the
full rows' positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from spindle.model.loss import IGNORE_INDEX  # a label that carries no loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64, the next token of the same document, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (B, L) int64, restarting at 0 at every document of a row
    type_ids: torch.Tensor  # (B, L) int64, the source (sub-folder) each token came from

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def num_labels(self) -> torch.Tensor:
        """How many tokens carry a loss (a 0-d tensor on the batch's device)."""
        return (self.labels != IGNORE_INDEX).sum()

    def without_labels(self) -> "Batch":
        """The same rows, no token carrying a loss (fills a pipeline's last group of validation)."""
        return Batch(self.input_ids, torch.full_like(self.labels, IGNORE_INDEX), self.position_ids, self.type_ids)

    def map(self, fn) -> "Batch":
        """`fn` applied to every field, e.g. a context-parallel rank's slice of the sequence."""
        return Batch(*(fn(getattr(self, f.name)) for f in fields(self)))

    @staticmethod
    def stack(batches: list["Batch"]) -> "Batch":
        """Micro-batches as the rows of one batch (a pipeline schedule splits them back by rows)."""
        return Batch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)))

    def document_lengths(self) -> list[list[int]]:
        """Per row, the lengths of its documents (from where the positions restart)."""
        out = []
        for row in self.position_ids.cpu():
            starts = torch.nonzero(row == 0).flatten().tolist() + [row.numel()]
            if starts[0] != 0:
                starts.insert(0, 0)
            out.append([b - a for a, b in zip(starts, starts[1:]) if b > a])
        return out
