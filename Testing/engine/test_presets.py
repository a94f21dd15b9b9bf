"""Modality presets: names, aliases, CT windows with their sources, guesses, model support."""

import numpy as np
import pytest
from conftest import shared_file

from textseg.errors import UsageError
from textseg.predictor import Predictor
from textseg.presets import (
    CT_WINDOW_SOURCES,
    CT_WINDOWS,
    MODALITIES,
    get_preset,
    guess_modality,
    normalize_modality,
    window_to_uint8,
)
from textseg.volume import Volume


def test_ten_modalities_and_dicom_aliases():
    assert len(MODALITIES) == 10 and "PET" in MODALITIES
    assert [normalize_modality(c) for c in ("MR", "PT", "US", "CR", "DX", "SM", "ct", "x-ray")] == [
        "MRI", "PET", "Ultrasound", "X-Ray", "X-Ray", "Pathology", "CT", "X-Ray"]
    with pytest.raises(UsageError, match="Choose one of"):
        normalize_modality("Sonar")


def test_ct_windows_are_upstream_numbers_with_sources():
    assert CT_WINDOWS["abdomen"] == (-150.0, 250.0) and CT_WINDOWS["lung"] == (-1000.0, 1000.0)
    assert CT_WINDOWS["liver"] == (-25.0, 230.0) and CT_WINDOWS["colon"] == (-68.0, 187.0)
    assert set(CT_WINDOW_SOURCES) == set(CT_WINDOWS)
    assert get_preset("CT", "Lung").window == (-1000.0, 1000.0)
    assert get_preset("CT").site == "abdomen"
    with pytest.raises(UsageError, match="Unknown CT site 'knee'"):
        get_preset("CT", "knee")


def test_window_to_uint8_ct_and_percentiles():
    ct = np.array([[-1000, -150, 50, 250, 3000]], float)
    np.testing.assert_array_equal(window_to_uint8(ct, get_preset("CT", "abdomen")), [[0, 0, 127, 255, 255]])
    mr = np.zeros((10, 10))
    mr[2:8, 2:8] = np.arange(36).reshape(6, 6) + 1
    out = window_to_uint8(mr, get_preset("MRI"))
    assert out.dtype == np.uint8 and out.max() == 255 and out[0, 0] == 0


def test_guess_from_dicom_tags_and_intensities():
    ct = Volume(np.zeros((2, 2, 2)), metadata={"dicom": {"Modality": "CT", "BodyPartExamined": "CHEST"}})
    assert guess_modality(ct)[:2] == ("CT", "lung")
    real_ct = shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")
    real_mr = shared_file("totalsegmentator-examples", "example_mr_sm.nii.gz")
    from textseg.formats.images import read_volume

    assert guess_modality(read_volume(real_ct))[0] == "CT"
    assert guess_modality(read_volume(real_mr))[0] == "MRI"
    assert guess_modality(Volume(np.zeros((1, 4, 4, 3), np.uint8)))[0] == "Pathology"
    assert guess_modality(Volume(np.arange(16.0).reshape(1, 4, 4)))[0] == "X-Ray"


def test_model_rejects_a_modality_it_does_not_support():
    p = Predictor("deepbet", device="cpu")
    with pytest.raises(UsageError, match="does not support CT images; it supports MRI"):
        p.set_image(Volume(np.zeros((4, 4, 4), np.int16)), "CT")
