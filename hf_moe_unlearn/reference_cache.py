"""A per-example cache of the frozen reference's sequence NLLs, so NPO-style losses run no reference forward twice.

NPO, IdkDPO and every loss registered with ``reference="sequence"`` compare the model with the frozen start model
only through ``ℓref(x)``, the reference's summed NLL of each sequence (and ``|x|``, its counted tokens). The reference
never trains, so ``ℓref(x)`` of an example is the same at every step: the trainer computes it the first time the
example is seen, in the reference forward that step runs anyway, and serves later epochs from here.

Why lazily and not in one pass before training: the first epoch then costs exactly what it cost without the cache
(and gives bit-identical values: same batches, same padding, same autocast), a run stopped early (``max_steps``,
``stop_at_holdout``) never pays for examples it does not reach, each process of a distributed run computes only
what it sees, and a resumed run needs nothing saved — it recomputes as it goes.

Later values come from the batch in which the example was first seen, so they equal the per-step value up to float
rounding (other batch partners and padding length change the matmul shapes, not the maths: right padding, causal
attention, and MoE routing that is per token). Token-level reference quantities (``kl``'s logits, RMU's hidden
states) would cost ``T × V`` or ``T × H`` floats per example and are not cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data.text import PaddingCollator
from .errors import MoEUnlearnError

#: Batch column carrying each forget example's index in the trainer's paired dataset (set by
#: ``PairedForgetRetainDataset``, passed through by ``PaddingCollator``).
EXAMPLE_INDEX = PaddingCollator.INDEX_KEY

SequenceNll = tuple[torch.Tensor, torch.Tensor]


class ReferenceCache:
    """``ℓref(x)`` and ``|x|`` of each example, per split (``"forget"``, ``"idk"``, ``"retain"``), stored once.

    Keys are indices in the paired dataset: a retain row is always the same retain example for a given forget
    index (the pairing is fixed by the seed), so the pair's index identifies the retain side as well.

    Args:
        size: number of examples (the paired dataset's length); indices must lie in ``[0, size)``.
        any_process: in a multi-process run, ``bool -> bool``, whether any process says True (a collective). Every
            process then runs the reference forward at the same steps, which FSDP and ZeRO-3 need (their forward
            gathers parameters from every process), and shares the values it computed.
        gather: in a multi-process run, ``tensor [B, ...] -> tensor [P·B', ...]``, every process's rows (padded to
            one length with index -1), so each process stores the values the others computed: once an epoch is
            done, every process has every example, whichever process sees it next.

    Values live on the device they were computed on (a lookup is a gather there); which examples are known is kept
    on the host, so a step costs one host sync (reading the batch's indices), none when nothing asks for it.
    """

    def __init__(self, size: int, any_process: Callable[[bool], bool] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if size < 1:
            raise MoEUnlearnError(f"A reference cache needs at least one example, got size={size}.")
        self.size = size
        self.any_process = any_process
        self.gather = gather
        self._values: dict[str, torch.Tensor] = {}  # split -> [2, size] float32: nll_sum, n_tokens
        self._known: dict[str, torch.Tensor] = {}  # split -> [size] bool, on the host
        self.computed = 0  # calls that ran the reference (at least one example of the batch unknown somewhere)
        self.served = 0  # calls served from the cache

    def known(self, split: str) -> int:
        """How many examples of ``split`` have a stored value."""
        return int(self._known[split].sum()) if split in self._known else 0

    def stored(self, split: str) -> dict[int, tuple[float, float]]:
        """``{example index: (ℓref, |x|)}`` of every stored example of ``split`` (for inspection and tests)."""
        if split not in self._values:
            return {}
        values = self._values[split].cpu()
        return {i: (float(values[0, i]), float(values[1, i]))
                for i in self._known[split].nonzero().flatten().tolist()}

    def sequence_nll(self, split: str, index: torch.Tensor, compute: Callable[[], SequenceNll]) -> SequenceNll:
        """``(nll_sum [B], n_tokens [B])`` of the batch whose rows are examples ``index`` ``[B]``.

        From the cache when every row (on every process) is known; otherwise ``compute()`` — the reference forward
        of this step, exactly what would run without a cache — whose values are returned as they are and stored for
        the rows not known yet (a stored value is never replaced, so it does not drift).
        """
        rows = self._rows(index)  # the one host sync of a step
        known = self._known.setdefault(split, torch.zeros(self.size, dtype=torch.bool))
        need = not bool(known[rows].all())
        if self.any_process is not None:
            need = self.any_process(need)
        if not need:
            self.served += 1
            picked = self._values[split][:, index.to(self._values[split].device)]
            return picked[0], picked[1]
        nll_sum, n_tokens = compute()
        self.computed += 1
        self._store(split, index, rows, nll_sum, n_tokens)
        return nll_sum, n_tokens

    # ------------------------------------------------------------------------------------------- internals
    def _rows(self, index: torch.Tensor) -> list[int]:
        if index.dim() != 1:
            raise MoEUnlearnError(f"{EXAMPLE_INDEX} must be a [B] tensor of example indices, got {tuple(index.shape)}.")
        rows = index.tolist()
        bad = [i for i in rows if not 0 <= i < self.size]
        if bad:
            raise MoEUnlearnError(
                f"{EXAMPLE_INDEX} {bad[0]} is outside the {self.size} examples the reference cache was built for: "
                f"the batch does not come from the trainer's own dataset. Set cache_reference=False to run the "
                f"reference forward at every step instead."
            )
        return rows

    def _store(self, split: str, index: torch.Tensor, rows: list[int], nll_sum: torch.Tensor,
               n_tokens: torch.Tensor) -> None:
        if nll_sum.shape != (len(rows),) or n_tokens.shape != (len(rows),):
            raise MoEUnlearnError(
                f"The reference's sequence NLLs of split {split!r} must be [B] = [{len(rows)}] (one per example), got "
                f"{tuple(nll_sum.shape)} and {tuple(n_tokens.shape)}."
            )
        values = torch.stack([nll_sum.detach().float(), n_tokens.detach().float()])  # [2, B]
        if self.gather is not None:
            index = self.gather(index.to(values.device).long())
            values = self.gather(values.t().contiguous()).t()
            rows = index.tolist()
        known = self._known[split]
        new, seen = [], set()
        for position, row in enumerate(rows):
            if row >= 0 and not known[row] and row not in seen:  # -1: padding of a shorter process's batch
                new.append(position)
                seen.add(row)
        if not new:
            return
        store = self._values.get(split)
        if store is None:
            store = self._values[split] = torch.zeros(2, self.size, dtype=torch.float32, device=values.device)
        chosen = [rows[p] for p in new]
        positions = torch.tensor(new, device=values.device)
        store[:, torch.tensor(chosen, device=values.device)] = values[:, positions]
        known[chosen] = True
