"""The MNIST-style preprocessing steps, on real digits rendered like photos."""

from __future__ import annotations

import numpy as np
import pytest

from predictors.models.preprocessing import paper_level, run_image_pipeline
from predictors.package import (
    AutoInvertStep,
    CenterOfMassStep,
    CropToInkStep,
    DecodeStep,
    FitStep,
    GrayscaleStep,
    ScaleStep,
)
from predictors.protocol.errors import DisallowedURL, InvalidImage
from predictors.protocol.fetch import check_address
from tests.fixtures.digits import photo_of_digit
from tests.support.v2 import png_bytes

MNIST_STEPS = [DecodeStep(), GrayscaleStep(), AutoInvertStep(), CropToInkStep(), FitStep(size=20),
               CenterOfMassStep(size=28), ScaleStep()]


def test_photo_becomes_an_mnist_like_array(mnist_digits):
    images, _ = mnist_digits
    rng = np.random.default_rng(0)
    for digit in images[:10]:
        out = run_image_pipeline(photo_of_digit(digit, rng), MNIST_STEPS)
        assert out.shape == (28, 28) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.5
        ys, xs = np.indices(out.shape)
        cy, cx = (ys * out).sum() / out.sum(), (xs * out).sum() / out.sum()
        assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0  # centred by mass
        ink = np.argwhere(out > 0.1)
        assert (ink.max(axis=0) - ink.min(axis=0) + 1).max() <= 21  # fitted into 20x20 (plus antialiasing)
        assert out[0, :].max() < 0.1 and out[:, 0].max() < 0.1  # background is dark after auto-invert


def test_light_on_dark_input_is_not_inverted(mnist_digits):
    digit = mnist_digits[0][0]
    out = run_image_pipeline(png_bytes(digit), MNIST_STEPS)
    assert out[0, 0] == 0.0 and out.max() > 0.5


def test_blank_image_stays_blank():
    out = run_image_pipeline(png_bytes(np.full((50, 80), 255, dtype=np.uint8)), MNIST_STEPS)
    assert out.shape == (28, 28) and float(out.max()) == 0.0


def test_pixel_limit():
    with pytest.raises(InvalidImage, match="pixels"):
        run_image_pipeline(png_bytes(np.zeros((100, 100), dtype=np.uint8)), [DecodeStep(max_pixels=5000)])


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "0.0.0.0", "224.0.0.1"])
def test_internal_addresses_are_refused(address):
    with pytest.raises(DisallowedURL):
        check_address(address, [])


def test_allow_list_exempts_a_network():
    import ipaddress

    check_address("10.1.2.3", [ipaddress.ip_network("10.0.0.0/8")])
    check_address("93.184.216.34", [])  # public


def test_unevenly_lit_paper_is_not_mistaken_for_ink(mnist_digits):
    """A photo lit from one side: the paper darkens by 120 levels across the frame, the ink stays darker."""
    digit = np.kron(mnist_digits[0][3], np.ones((2, 2), dtype=np.uint8)).astype(np.float32)  # 56×56
    paper = np.tile(250.0 - 120.0 * np.arange(240) / 239.0, (160, 1))  # darkens left to right
    photo = paper.copy()
    photo[50:106, 20:76] -= (paper[50:106, 20:76] - 20.0) * digit / 255.0  # on the bright side
    steps = [DecodeStep(), GrayscaleStep(), AutoInvertStep(), CropToInkStep()]
    cropped = run_image_pipeline(png_bytes(np.clip(photo, 0, 255)), steps)
    ink_rows, ink_cols = np.flatnonzero(digit.max(axis=1) > 51), np.flatnonzero(digit.max(axis=0) > 51)
    assert abs(cropped.shape[0] - (ink_rows[-1] - ink_rows[0] + 1)) <= 2
    assert abs(cropped.shape[1] - (ink_cols[-1] - ink_cols[0] + 1)) <= 2
    assert cropped.max() == pytest.approx(255.0) and np.median(cropped) < 60


def test_paper_level_follows_a_tilted_plane_under_ink():
    ys, xs = np.mgrid[0:120, 0:90].astype(np.float32)
    plane = 10.0 + 0.3 * xs + 0.2 * ys
    pixels = plane.copy()
    pixels[40:80, 30:50] += 150.0  # a bright stroke (ink after inversion) must not lift the estimate
    np.testing.assert_allclose(paper_level(pixels), plane, atol=1.5)
