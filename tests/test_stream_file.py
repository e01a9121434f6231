import pytest
import torch

from sed_lens.analysis.stream_file import StreamFile
from sed_lens.errors import SedLensError


def test_entries_read_back_exactly_as_written_and_slices_are_views(tmp_path):
    xs = [torch.randn(37) for _ in range(9)]
    stream = StreamFile(tmp_path / "s" / "gradient.bin")
    for x in xs:
        stream.append(x)
    assert len(stream) == 9 and (tmp_path / "s" / "gradient.bin").stat().st_size == 9 * 37 * 4
    assert all(torch.equal(stream[i], x) for i, x in enumerate(xs))
    assert torch.equal(stream[-1], xs[-1]) and stream[3].dtype == torch.float32
    part = stream[2:8]
    assert len(part) == 6 and torch.equal(part[0], xs[2]) and torch.equal(part[-1], xs[7])
    assert len(part[1:3]) == 2 and torch.equal(part[1:3][1], xs[4])
    assert [torch.equal(a, b) for a, b in zip(part, xs[2:8], strict=True)] == [True] * 6
    stream[0].add_(1)  # a read is a copy: the file is untouched
    assert torch.equal(stream[0], xs[0])
    doubles = StreamFile(tmp_path / "d.bin")
    doubles.append(torch.arange(5, dtype=torch.float64))
    assert doubles[0].dtype == torch.float64 and doubles[0].tolist() == [0, 1, 2, 3, 4]


def test_a_new_stream_file_starts_empty_and_delete_removes_it(tmp_path):
    path = tmp_path / "u.bin"
    path.write_bytes(b"x" * 100)
    stream = StreamFile(path)
    assert len(stream) == 0 and path.stat().st_size == 0
    stream.append(torch.ones(3))
    stream.delete()
    assert not path.exists()
    with pytest.raises(SedLensError, match="is closed"):
        stream.append(torch.ones(3))


def test_stream_file_errors(tmp_path):
    stream = StreamFile(tmp_path / "e.bin")
    with pytest.raises(SedLensError, match="flat"):
        stream.append(torch.ones(2, 2))
    stream.append(torch.ones(4))
    with pytest.raises(SedLensError, match=r"must all be \[4\] torch.float32"):
        stream.append(torch.ones(5))
    with pytest.raises(SedLensError, match=r"must all be \[4\] torch.float32"):
        stream.append(torch.ones(4, dtype=torch.float64))
    with pytest.raises(IndexError, match="out of range"):
        stream[1]
    with (tmp_path / "e.bin").open("r+b") as f:
        f.truncate(8)
    with pytest.raises(SedLensError, match="truncated"):
        stream[0]
