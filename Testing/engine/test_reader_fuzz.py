"""Seeded fuzzing of the readers (issue 14, proof): a few hundred mutations per format (NIfTI, NRRD,
MetaImage, a DICOM series, DICOM SEG; Testing/fuzzing.py), each read by ``read_volume`` in its reader
child under a time and a memory limit. Every case must be read with geometry an independent oracle confirms,
or refused with one line of the project's error classes; never a signal, a hang, the memory limit, another
exception, or silently wrong geometry. benchmarks/fuzz_readers.py runs the same with more cases."""

from __future__ import annotations

import collections
import logging
import warnings

import fuzzing
import numpy as np
import pytest
from conftest import SHARED

COUNTS = {"nifti": 200, "nrrd": 200, "meta": 200, "dicom": 200, "seg": 60}
SEED = 14


def test_reader_fuzz(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from textseg.formats import read_isolated
    from textseg.formats.images import read_volume
    from textseg.formats.segment_files import read_segments

    monkeypatch.setenv("TEXTSEG_READ_TIMEOUT", "20")
    monkeypatch.setenv("TEXTSEG_READ_MAX_MEMORY_MB", "512")
    logging.getLogger("nibabel").setLevel(logging.ERROR)  # the oracle's header parse talks about odd headers
    series = SHARED / "totalsegmentator-examples" / "example_ct_dicom"
    seeds = fuzzing.make_image_seeds(tmp_path / "seeds")
    seeds.update(fuzzing.make_dicom_seeds(tmp_path / "seeds", series if series.exists() else None))
    seeds["seg"] = fuzzing.make_seg_seed(tmp_path / "seeds", seeds["dicom_native"])
    starts = read_isolated.reader_starts()
    stats = collections.Counter()
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case, outcome in fuzzing.run_cases(np.random.default_rng(SEED), tmp_path, seeds, COUNTS, read_volume,
                                               read_segments):
            stats[case.fmt, outcome.kind] += 1
            if outcome.kind == "FAIL":
                failures.append(f"{case.path.name} {case.mutations}: {outcome.detail}")
    assert not failures, "\n".join(failures[:20])
    assert read_isolated.reader_starts() - starts <= 1  # the reader child never died
    for fmt, n in COUNTS.items():  # both paths are exercised in every format
        assert stats[fmt, "read"] + stats[fmt, "refused"] == n
        assert stats[fmt, "read"] >= n // 20 and stats[fmt, "refused"] >= n // 5, dict(stats)
