"""A stream's entries on disk: the vectors of one SED stream over a whole trajectory, read back one at a time.

A scan keeps every stream's entry at every snapshot, because the SED window of a snapshot reaches W entries
ahead of it (the leading window) and several run lengths and window sizes read the same entries. In memory that is
streams × snapshots × P floats: about 1.7 GB for the paper's multitask run (10 streams × 321 snapshots of the
131,072 attention weights). A :class:`StreamFile` writes each entry to one flat file as it is computed and reads
entries back with plain file reads — no memory map, so what it has read never counts towards the process's
resident memory; the operating system's page cache keeps the file hot. That is all a streaming SED pass needs
(:func:`~sed_lens.analysis.sed.iter_sed_over_sequence` reads each entry once, in order).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import torch
from torch import Tensor

from sed_lens.errors import SedLensError, check


class _Entries(Sequence[Tensor]):
    """Entries ``positions`` of a :class:`StreamFile`, read on access; slicing gives another view (no read)."""

    def __init__(self, stream: StreamFile, positions: range) -> None:
        self._stream, self._positions = stream, positions

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Tensor]: ...

    def __getitem__(self, i: int | slice) -> Tensor | Sequence[Tensor]:
        if isinstance(i, slice):
            return _Entries(self._stream, self._positions[i])
        try:
            position = self._positions[i]
        except IndexError:
            raise IndexError(f"stream entry {i} is out of range (the view has {len(self)}).") from None
        return self._stream.read(position)


class StreamFile(_Entries):
    """A sequence of equal-length flat vectors stored in ``path`` (created, or emptied if it exists).

    :meth:`append` adds an entry; ``stream[i]`` reads entry ``i`` back as a new tensor on the device and with the
    dtype the first entry had; ``stream[a:b]`` is a view of those entries (no copy, no read). :meth:`close` closes
    the file and :meth:`delete` removes it.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(self, range(0))
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._dim: int | None = None
        self._dtype = torch.float32
        self._device = torch.device("cpu")

    # --- writing ---------------------------------------------------------------------------------------------
    def append(self, vector: Tensor) -> None:
        """Write ``vector`` (flat, ``[P]``) as the next entry."""
        check(isinstance(vector, Tensor) and vector.ndim == 1,
              f"a stream entry is a flat [P] vector, got {tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__}.")
        if self._dim is None:
            self._dim, self._dtype, self._device = vector.shape[0], vector.dtype, vector.device
        check(vector.shape[0] == self._dim and vector.dtype == self._dtype,
              f"stream entries must all be [{self._dim}] {self._dtype}, got [{vector.shape[0]}] {vector.dtype}.")
        data = vector.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        os.pwrite(self._open_fd(), data, len(self._positions) * len(data))
        self._positions = range(len(self._positions) + 1)

    # --- reading ---------------------------------------------------------------------------------------------
    def read(self, i: int) -> Tensor:
        """Entry ``i`` (0 ≤ i < len) as a new tensor."""
        assert self._dim is not None
        nbytes = self._dim * self._dtype.itemsize
        buf = bytearray(nbytes)
        if os.preadv(self._open_fd(), [buf], i * nbytes) != nbytes:
            raise SedLensError(f"stream file {self.path} is truncated: entry {i} is incomplete.")
        return torch.frombuffer(buf, dtype=self._dtype).to(self._device)

    # --- lifetime --------------------------------------------------------------------------------------------
    def _open_fd(self) -> int:
        check(self._fd is not None, f"stream file {self.path} is closed.")
        assert self._fd is not None
        return self._fd

    def close(self) -> None:
        """Close the file (reading or writing afterwards is an error)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def delete(self) -> None:
        """Close and remove the file."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the OS closes the descriptor anyway
            pass
