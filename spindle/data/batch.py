"""The one batch type, from every loader (tokenized, text, streaming, SFT, validation) to every step executor.

A `Batch` is one micro-batch of `B` rows of `L` tokens, row-local: documents never cross a row, so a
row's documents are given by its own `position_ids`, which restart at 0 where a document (or the
fragment of one, or a row) starts. Nothing else describes them. The loader reads them on the host,
where it builds the batch (`documents`, a spindle.model.attention.HostLayout over the host copy of the
positions), and that host copy travels with the batch to the device: attention, RoPE scaling, context
parallelism and pipeline stages take the documents from it, so no forward copies the positions back
(a device->host copy would stall the CPU until the GPU's queued work ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spindle.model.attention import HostLayout
from spindle.model.loss import IGNORE_INDEX  # a label that carries no loss

TENSORS = ("input_ids", "labels", "position_ids", "type_ids")  # every (B, L) tensor of a batch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64, the next token of the same document, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (B, L) int64, restarting at 0 at every document of a row
    type_ids: torch.Tensor  # (B, L) int64, the source (sub-folder) each token came from
    # the documents read on the host from the positions; None only for a batch made on the device
    documents: Optional[HostLayout] = None

    def __post_init__(self):
        if self.documents is None and self.position_ids.device.type == "cpu":
            # read lazily: a batch made by hand may still have its positions changed before it runs
            self.documents = HostLayout(self.position_ids)

    def _with(self, fn, documents: Optional[HostLayout]) -> "Batch":
        return Batch(*(fn(getattr(self, name)) for name in TENSORS), documents=documents)

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """The tensors on `device`; the host layout stays on the host, and with the batch."""
        return self._with(lambda t: t.to(device, non_blocking=non_blocking), self.documents)

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
        return Batch(self.input_ids, torch.full_like(self.labels, IGNORE_INDEX), self.position_ids, self.type_ids,
                     self.documents)

    def map(self, fn) -> "Batch":
        """`fn` applied to every tensor, e.g. a context-parallel rank's slice of the sequence (the documents
        are read again from the new positions, if they are on the host)."""
        return self._with(fn, None)

    @staticmethod
    def stack(batches: list["Batch"]) -> "Batch":
        """Micro-batches as the rows of one batch (a pipeline schedule splits them back by rows)."""
        layouts = [b.documents for b in batches]
        documents = HostLayout.stack(layouts) if all(h is not None for h in layouts) else None
        return Batch(*(torch.cat([getattr(b, name) for b in batches]) for name in TENSORS), documents=documents)

    def document_lengths(self) -> list[list[int]]:
        """Per row, the lengths of its documents (from where the positions restart)."""
        documents = self.documents or HostLayout(self.position_ids.cpu())
        length = self.position_ids.shape[1]
        return [[b - a for a, b in zip(starts, starts[1:] + (length,))] for starts in documents.row_starts]
