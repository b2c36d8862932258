"""services/model_client/bank.py: Scatter (a block's destination in pieces) and the check of
`out` destinations every Bank applies before any I/O.

Run: .venv/bin/python -m pytest -q tests/unit/test_bank.py
"""
import numpy as np
import pytest

from services.model_client.bank import Scatter, destination


def test_scatter_writes_across_pieces_in_order():
    pieces = [bytearray(3), bytearray(0), bytearray(5), bytearray(2)]
    s = Scatter(pieces)
    assert len(s) == s.nbytes == 10
    data = bytes(range(1, 11))
    # chunks that start and end inside pieces, as gRPC chunks do
    for start, end in ((0, 2), (2, 4), (4, 9), (9, 10)):
        s.write(start, data[start:end])
    assert s.tobytes() == data
    assert b"".join(pieces) == data              # the caller's own buffers hold the bytes


def test_scatter_pieces_may_be_strided_rows_of_a_bigger_array():
    room = np.zeros((2, 3, 4), dtype=np.uint8)   # (layers, rows R, width); a level owns rows 1..2
    s = Scatter(room[j, 1:3] for j in range(2))
    s.write(0, bytes(range(16)))
    assert room[:, 0].sum() == 0 and room[0, 1:3].ravel().tolist() == list(range(8))
    assert room[1, 1:3].ravel().tolist() == list(range(8, 16))


@pytest.mark.parametrize("offset, n", [(-1, 1), (8, 3), (0, 11)])
def test_scatter_refuses_bytes_that_do_not_fit(offset, n):
    s = Scatter([bytearray(4), bytearray(6)])
    with pytest.raises(ValueError, match="do not fit"):
        s.write(offset, bytes(n))


def test_destination_checks_size_and_writability():
    assert destination(bytearray(4), 4, (1, 0)).nbytes == 4
    s = Scatter([bytearray(4)])
    assert destination(s, 4, (1, 0)) is s
    for bad in (bytearray(3), bytes(4), memoryview(bytes(4)), Scatter([bytearray(5)])):
        with pytest.raises(ValueError, match=r"block \(1, 0\) must be writable and 4 bytes"):
            destination(bad, 4, (1, 0))
    with pytest.raises(ValueError, match="writable"):
        Scatter([bytes(4)])
