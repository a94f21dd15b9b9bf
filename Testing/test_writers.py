"""seg.nrrd round trip with slicerio: geometry, overlapping segments, tags, no silent overwrite."""

import numpy as np
import pytest

from textseg.errors import OutputExistsError
from textseg.volume import Volume
from textseg.writers import Segment, read_seg_nrrd, write_seg_nrrd


def test_round_trip_overlapping_segments(tmp_path):
    v = Volume(np.zeros((4, 5, 6), np.int16), (0.5, 0.7, 2.0), (10, 20, 30), np.diag([-1.0, 1.0, 1.0]))
    a = np.zeros(v.shape, np.uint8)
    a[1:3, 1:3, 1:4] = 1
    b = np.zeros(v.shape, np.uint8)
    b[2:4, 2:4, 2:5] = 1  # overlaps a: needs a second layer
    path = tmp_path / "out.seg.nrrd"
    write_seg_nrrd(path, v, [Segment("liver", a, (1.0, 0.0, 0.0), tags={"textseg.model": "m"}), Segment("left kidney", b)])
    ref, segs = read_seg_nrrd(path)
    assert ref.same_grid(v)
    assert [s.name for s in segs] == ["liver", "left kidney"]
    np.testing.assert_array_equal(segs[0].mask, a)
    np.testing.assert_array_equal(segs[1].mask, b)
    assert segs[0].color == (1.0, 0.0, 0.0) and segs[0].tags["textseg.model"] == "m"


def test_existing_output_is_kept(tmp_path):
    v = Volume(np.zeros((2, 2, 2), np.int16))
    path = tmp_path / "out.seg.nrrd"
    path.write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_seg_nrrd(path, v, [Segment("x", np.ones(v.shape, np.uint8))])
    assert path.read_bytes() == b"user data"
    write_seg_nrrd(path, v, [Segment("x", np.ones(v.shape, np.uint8))], overwrite=True)
    assert read_seg_nrrd(path)[1][0].mask.sum() == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]  # no temp files left
