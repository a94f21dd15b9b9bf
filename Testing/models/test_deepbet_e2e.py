"""The embedded default model, for real: deepbet on the MNI152 head against its brain mask."""

import numpy as np
import pytest
from conftest import shared_file

pytest.importorskip("deepbet")


@pytest.fixture(scope="module")
def mni():
    from textseg.formats.images import read_volume

    return read_volume(shared_file("mni152", "MNI152_T1.nii.gz")), read_volume(shared_file("mni152",
                                                                                           "MNI152_mask.nii.gz"))


@pytest.fixture(scope="module")
def ours_on_stored(mni):
    """Our result on the MNI152 head as stored (one run shared by the tests that compare against it)."""
    from textseg.predictor import Predictor

    p = Predictor("deepbet", device="cpu")
    p.set_image(mni[0], "MRI")
    return p.predict(["brain"])[0]


def dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_deepbet_brain_dice(mni, ours_on_stored):
    t1, truth = mni
    r = ours_on_stored
    assert r.mask.shape == t1.shape and r.mask.dtype == np.uint8
    assert dice(r.mask, truth.array) >= 0.93
    assert r.provenance["model"] == "deepbet" and r.provenance["weights_revision"] == "1.0.2,1.0.2"


def test_deepbet_on_a_flipped_copy_gives_the_same_physical_mask(mni, ours_on_stored):
    """Same head stored with i and k reversed: the model must see the same canonical array."""
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    t1, _ = mni
    m = t1.ijk_to_lps
    size = np.array(t1.size)
    origin = m[:3, 3] + m[:3, 0] * (size[0] - 1) + m[:3, 2] * (size[2] - 1)
    direction = t1.direction @ np.diag([-1.0, 1.0, -1.0])
    flipped = Volume(t1.array[::-1, :, ::-1].copy(), t1.spacing, tuple(origin), direction)
    ref = ours_on_stored.mask
    p = Predictor("deepbet", device="cpu")
    p.set_image(flipped, "MRI")
    got = p.predict(["brain"])[0].mask
    np.testing.assert_array_equal(got[::-1, :, ::-1], ref)


def test_equals_deepbets_own_pipeline(mni, ours_on_stored):
    """Our adapter (canonical LPS -> deepbet's RAS order -> back) gives deepbet's own mask, voxel for voxel."""
    import nibabel as nib
    from deepbet import BrainExtraction

    path = shared_file("mni152", "MNI152_T1.nii.gz")
    _, mask_img, _ = BrainExtraction(no_gpu=True).run(nib.load(str(path)))
    theirs = np.asarray(mask_img.dataobj).astype(np.uint8).transpose(2, 1, 0)  # nibabel [x,y,z] -> [k,j,i]
    np.testing.assert_array_equal(ours_on_stored.mask, theirs)


@pytest.mark.parametrize("case", ["tilted", "oblique"])
def test_equals_deepbets_own_pipeline_on_a_head_turned_through_its_header(mni, tmp_path, case):
    """The MNI152 head tilted 12 degrees about R, or turned 20 degrees about S and 10 about R, by its header only
    (Testing/oracles/real_scans.py). deepbet reorders the array to nibabel's closest canonical orientation
    (no resampling) and back; we reorder to the closest LPS orientation: both keep the rotation, so the network
    sees the unrotated array. Our adapter, reading the file the user's way, gives deepbet's own mask on the input
    grid voxel for voxel."""
    import nibabel as nib
    from deepbet import BrainExtraction
    from real_scans import save_nifti, turned_copy

    from textseg.formats.images import read_volume
    from textseg.predictor import Predictor

    array, affine = turned_copy(shared_file("mni152", "MNI152_T1.nii.gz"), case)
    path = tmp_path / f"mni_{case}.nii.gz"
    save_nifti(array, affine, path)
    img = nib.load(str(path))
    assert nib.io_orientation(img.affine).tolist() == nib.io_orientation(nib.load(str(shared_file("mni152",
                                                                                                  "MNI152_T1.nii.gz"))).affine).tolist()
    _, mask_img, _ = BrainExtraction(no_gpu=True).run(img)
    theirs = np.asarray(mask_img.dataobj).astype(np.uint8).transpose(2, 1, 0)
    vol = read_volume(path)
    turn = np.degrees(np.arccos(np.clip(np.abs(np.diag(vol.direction.T @ mni[0].direction)), 0, 1)))
    assert turn.max() > 9.9
    p = Predictor("deepbet", device="cpu")
    p.set_image(vol, "MRI")
    ours = p.predict(["brain"])[0].mask
    assert ours.shape == theirs.shape and 1.8e6 < theirs.sum() < 2.0e6
    np.testing.assert_array_equal(ours, theirs)
