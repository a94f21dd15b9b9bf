"""Damaged and hostile image files (issue 14, items 3, 5, 6, 9): each is the smallest file that showed the
problem, built here. The reader answers with one InputError line: no crash (signal), hang, memory blow-up,
garbage or zero-filled volume, traceback, or ITK/GDCM warning block."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, shared_file

from textseg.errors import InputError
from textseg.formats.images import read_volume

ARR = np.arange(6 * 5 * 4, dtype=np.int16).reshape(4, 5, 6)


def _write(path: Path, array=ARR, compress=False) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((0.5, 0.7, 2.0))
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _replace(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


# ---- item 5: native crashes and hangs ------------------------------------------------------------------------
def test_nrrd_field_line_of_1000_characters(tmp_path):
    """An unknown field line of >= ~1000 characters: SIGSEGV inside ITK's NRRD reader."""
    p = _write(tmp_path / "long.nrrd")
    _replace(p, b"kinds:", b"foo: " + b"x" * 1000 + b"\nkinds:")
    with pytest.raises(InputError, match=r"long\.nrrd: NRRD header line \d+ is 1005 characters long"):
        read_volume(p)


@pytest.mark.parametrize("ndims", [b"-1", b"99999"])
def test_metaimage_with_absurd_ndims(tmp_path, ndims):
    """NDims = -1 or 99999: SIGSEGV (and a 100 % CPU spin) inside ITK's MetaImage reader."""
    p = _replace(_write(tmp_path / "n.mha"), b"NDims = 3", b"NDims = " + ndims)
    with pytest.raises(InputError, match=rf"n\.mha: invalid MetaImage header: NDims = {ndims.decode()} "):
        read_volume(p)


def test_a_reader_crash_or_hang_is_one_line_and_the_next_read_works():
    """The safety net under the checks: a read that dies by a signal or runs past its time limit."""
    from textseg.formats import read_isolated

    folder = shared_file("totalsegmentator-examples", "example_ct_dicom")  # ~0.5 s of JPEG 2000 decoding
    reader = read_isolated.ReaderProcess()
    try:
        with pytest.raises(InputError, match=r"example_ct_dicom: reading took longer than 0\.05 s and was stopped"):
            reader.read(folder, timeout=0.05)
        assert reader.read(shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz"), timeout=60).shape[0] == 30
        pid = reader._proc.pid

        def segv():
            time.sleep(0.15)  # the series takes >= 0.4 s to decode: the signal lands mid-read
            os.kill(pid, signal.SIGSEGV)
        threading.Thread(target=segv).start()
        with pytest.raises(InputError, match=r"example_ct_dicom: cannot be read as an image: the image reader crashed "
                                             r"\(SIGSEGV\) on this file"):
            reader.read(folder, timeout=60)
        assert reader.read(folder, timeout=60).shape == (20, 512, 512)
        assert reader.starts == 3
    finally:
        reader.close()


# ---- item 3: broken files read as valid ------------------------------------------------------------------------
def _nifti(path: Path, array=ARR) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array.T, np.diag([0.5, 0.7, 2.0, 1])), str(path))
    return path


def test_nifti_bitpix_8_datatype_int16_half_the_data_missing(tmp_path):
    """The completeness check trusted bitpix: the second half was read as zeros."""
    p = _nifti(tmp_path / "b.nii")
    raw = bytearray(p.read_bytes())
    raw[72:74] = struct.pack("<h", 8)
    p.write_bytes(bytes(raw[: 352 + ARR.nbytes // 2]))
    with pytest.raises(InputError,
                       match=r"b\.nii: cannot be read as an image: the file ends before its pixel data does "
                                         r"\(120 of 240 bytes"):
        read_volume(p)


def test_nifti_bitpix_mismatch_with_complete_data_reads_by_datatype(tmp_path):
    p = _nifti(tmp_path / "c.nii")
    raw = bytearray(p.read_bytes())
    raw[72:74] = struct.pack("<h", 8)
    p.write_bytes(bytes(raw))
    v = read_volume(p)
    np.testing.assert_array_equal(v.array, ARR)
    assert any("bitpix (8) does not match its datatype int16" in n for n in v.metadata["notes"])


def test_metaimage_compressed_flag_over_raw_bytes(tmp_path):
    """CompressedData = True over raw bytes: ITK printed 'Uncompress failed' and returned garbage."""
    p = _replace(_write(tmp_path / "z.mha"), b"CompressedData = False", b"CompressedData = True")
    with pytest.raises(InputError, match=r"z\.mha: the MetaImage header says CompressedData = True but the data is not "
                                         r"a zlib/gzip stream"):
        read_volume(p)


def test_metaimage_compressed_stream_shorter_than_declared(tmp_path):
    p = _write(tmp_path / "short.mha", compress=True)
    data = p.read_bytes()
    head, body = data.split(b"ElementDataFile = LOCAL\n")
    head = head.replace(b"DimSize = 6 5 4", b"DimSize = 6 5 40")
    p.write_bytes(head + b"ElementDataFile = LOCAL\n" + zlib.compress(ARR.tobytes()))
    with pytest.raises(InputError, match=r"short\.mha: cannot be read as an image: the file ends before its pixel data "
                                         r"does \(240 of 2400 bytes"):
        read_volume(p)


# ---- item 9: tracebacks and wrong messages ------------------------------------------------------------------------
def test_nifti_datatype_larger_than_the_data(tmp_path):
    """float32 data labelled float64: nibabel's OSError escaped read_volume (a traceback)."""
    p = _nifti(tmp_path / "f.nii", ARR.astype(np.float32))
    raw = bytearray(p.read_bytes())
    raw[70:72] = struct.pack("<h", 64)  # datatype float64, bitpix stays 32
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError,
                       match=r"f\.nii: cannot be read as an image: the file ends before its pixel data does"):
        read_volume(p)


@pytest.mark.parametrize("name", ["two.nii", "two.nii.gz"])
def test_nifti2_reads_like_the_same_nifti1(tmp_path, name):
    """NIfTI-2 was reported as truncated or corrupt; ITK does not read it, nibabel does."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 6, 5)).astype(np.float32)
    affine = np.array([[0, -0.8, 0, 12.5], [0.6, 0, 0, -40], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "one.nii"))
    two = nib.Nifti2Image(data, affine)
    two.header.set_slope_inter(2.0, -3.0)
    nib.save(two, str(tmp_path / name))
    ref = read_volume(tmp_path / "one.nii")
    v = read_volume(tmp_path / name)
    assert v.same_grid(ref, tol=1e-6)
    np.testing.assert_allclose(v.array, ref.array, rtol=1e-6)


def test_cli_error_is_one_line_without_gdcm_or_itk_output(tmp_path, capfd, monkeypatch):
    """A series with a slice missing and a damaged JPEG 2000 slice: GDCM's 'Expected a SOC marker' lines and
    ITK's 'Non uniform sampling' warning block came before (or instead of) the one-line error."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate

    from textseg.cli import main

    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    src = sorted(shared_file("totalsegmentator-examples", "example_ct_dicom").iterdir())
    folder = tmp_path / "series"
    folder.mkdir()
    for k, f in enumerate(src):
        if k == 12:
            continue
        ds = pydicom.dcmread(f)
        if k == 3:
            ds.PixelData = encapsulate([b"\x00" * 100])
        ds.save_as(folder / f.name)
    rc = main(["-q", "segment", str(folder), "-m", "synthetic-3d", "-p", "bone", "--out", str(tmp_path / "o.seg.nrrd")])
    err = capfd.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {folder / src[3].name}: the pixel data is not a JPEG 2000")
    assert "not a JPEG 2000" in err and not (tmp_path / "o.seg.nrrd").exists()


# ---- item 6: memory blow-ups from tiny files ------------------------------------------------------------------------
def test_tiny_files_declaring_huge_images_are_refused_before_allocating(tmp_path):
    """A 4.7 KB NIfTI declaring 1024^3 took 2.2 GB, a 4.5 KB NRRD declaring 2048x2048x512 4.2 GB, a damaged DICOM
    slice 1-3.7 GB inside GDCM, all before the error. Read in a fresh process: its peak memory stays small."""
    import nibabel as nib

    pydicom = pytest.importorskip("pydicom")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    (tmp_path / "big.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\1" * 4300)
    (tmp_path / "big.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2048 2048 512\nencoding: raw\n"
                                        b"endian: little\n\n" + b"\1" * 4400)
    ds = pydicom.dcmread(sorted(shared_file("totalsegmentator-examples", "example_ct_dicom").iterdir())[0])
    ds.Rows = ds.Columns = 16384
    (tmp_path / "dcm").mkdir()
    ds.save_as(tmp_path / "dcm" / "slice.dcm")
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'BiomedParseSlicer')!r})\n"
              "from textseg.formats.images import read_volume\nfrom textseg.errors import InputError\n"
              "for p in sys.argv[1:]:\n    try:\n        read_volume(p)\n        print('READ', p)\n"
              "    except InputError as e:\n        print(e)\n")
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-c', sys.argv[1]] + sys.argv[2:], capture_output=True, text=True)\n"
             "print(r.stdout + r.stderr)\nprint('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", probe, script, str(tmp_path / "big.nii"), str(tmp_path / "big.nrrd"),
                          str(tmp_path / "dcm")], capture_output=True, text=True, timeout=300).stdout
    lines = out.strip().splitlines()
    assert "big.nii: cannot be read as an image: the file ends before its pixel data does (4300 of 2147483648" in out
    assert "big.nrrd: cannot be read as an image: the file ends before its pixel data does (4400 of 4294967296" in out
    assert "slice.dcm: the compressed image is 512x512 pixels but the header says 16384x16384" in out
    peak_mb = int(lines[-1].split()[1]) / 1024
    assert peak_mb < 600, out


def test_a_declared_size_beyond_the_available_memory_is_refused(tmp_path, monkeypatch):
    p = _write(tmp_path / "m.nrrd", np.zeros((64, 64, 64), np.int16))
    monkeypatch.setenv("TEXTSEG_READ_MAX_MEMORY_MB", "0.5")
    with pytest.raises(InputError,
                       match=r"m\.nrrd: its 64x64x64 int16 voxels need 0\.5 MiB of memory \(twice that while "
                                         r"reading\) but only 0\.5 MiB is available"):
        read_volume(p)


def test_nifti_with_an_infinite_sform_entry(tmp_path):
    """Found by the fuzz run: an 'inf' in srow of a rotated image made ITK spin for ever (the reader's time limit
    stopped it); the header check refuses it first."""
    import math

    img = sitk.GetImageFromArray(ARR)
    t = math.radians(20)
    img.SetDirection((math.cos(t), -math.sin(t), 0, math.sin(t), math.cos(t), 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / "inf.nii"))
    raw = bytearray((tmp_path / "inf.nii").read_bytes())
    raw[280 + 6 * 4:280 + 7 * 4] = struct.pack("<f", float("inf"))  # srow_y[2]
    (tmp_path / "inf.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"inf\.nii: invalid NIfTI header: its sform \(srow\) holds NaN or infinite"):
        read_volume(tmp_path / "inf.nii")


def test_where_no_reader_child_can_start_reading_happens_in_process(tmp_path, monkeypatch, caplog):
    """E.g. an embedded interpreter whose sys.executable cannot run a script: one warning, then in-process reads."""
    from textseg.formats import read_isolated

    reader = read_isolated.ReaderProcess()
    monkeypatch.setattr(read_isolated.sys, "executable", "/bin/false")
    monkeypatch.setattr(read_isolated, "_READER", reader)
    monkeypatch.setattr(read_isolated, "_NO_CHILD", [])
    p = _write(tmp_path / "ok.nrrd")
    with caplog.at_level("WARNING", logger="textseg"):
        v = read_volume(p)
        np.testing.assert_array_equal(read_volume(p).array, ARR)
    np.testing.assert_array_equal(v.array, ARR)
    assert reader.starts == 1 and [r.getMessage() for r in caplog.records if "reader process" in r.getMessage()] == [
        "textseg: cannot start the image reader process (the reader process did not start); reading in this process, "
        "without its memory and time limits."]


def test_damaged_deflate_data_inside_a_nii_gz(tmp_path):
    """ITK reads damaged gzip data as zeros without a word (a quarter of a volume here); the check inflates the
    stream with zlib, which checks it."""
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 1000, (40, 64, 64)).astype(np.int16)
    _write(tmp_path / "ok.nii.gz", arr, compress=True)
    data = bytearray((tmp_path / "ok.nii.gz").read_bytes())
    for i in range(50):
        data[len(data) // 3 + 7 * i] ^= 0x5A
    (tmp_path / "bad.nii.gz").write_bytes(bytes(data))
    with pytest.raises(InputError,
                       match=r"bad\.nii\.gz: cannot be read as an image \(damaged compressed data: Error -3"):
        read_volume(tmp_path / "bad.nii.gz")


@pytest.mark.parametrize("name, old, new, message", [
    ("s.mha", b"ElementSpacing = 0.5 0.69999999999999996 2", b"ElementSpacing = 0 0 0",
     r"invalid MetaImage header: ElementSpacing = '0 0 0' \(voxel sizes must be positive\)"),
    ("t.mha", b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 0 0 0 0 0 0 0 0 0",
     r"invalid MetaImage header: TransformMatrix = '0 0 0 0 0 0 0 0 0' is not an orientation"),
    ("d.nrrd", b"(0,0,2)", b"(0,0,0)", r"invalid NRRD header: the space direction of axis 3 is \(0\.0, 0\.0, 0\.0\)"),
])
def test_degenerate_geometry_fields_are_named(tmp_path, name, old, new, message):
    """ITK refused these with only the numbers ('(0 0 0)', 'Refusing to change spacing ...')."""
    p = _replace(_write(tmp_path / name), old, new)
    with pytest.raises(InputError, match=re.escape(name) + ": " + message):
        read_volume(p)


def test_relative_paths_follow_the_callers_working_folder(tmp_path, monkeypatch):
    """The reader child outlives changes of the caller's working folder."""
    read_volume(shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz"))  # the child is running
    (tmp_path / "a").mkdir()
    _write(tmp_path / "a" / "rel.nrrd")
    monkeypatch.chdir(tmp_path / "a")
    np.testing.assert_array_equal(read_volume("rel.nrrd").array, ARR)
