"""The crop the JPEG-bytes path draws before decoding is timm's RandomResizedCrop, in
distribution: scale, aspect ratio, position and the centre fallback, against timm's own
`get_params` (two-sample Kolmogorov-Smirnov tests on 20,000 crops each, fixed seeds)."""
import random

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

from cvtkit.data.jpeg_crop import RandomResizedCropParams

DRAWS = 20_000  # enough to tell a uniform aspect ratio from timm's log-uniform one


def crops(draw, width, height):
    return np.array([draw() for _ in range(DRAWS)], dtype=float)  # (top, left, h, w)


def features(c, width, height):
    top, left, h, w = c.T
    movable_y, movable_x = height - h > 0, width - w > 0
    return {"area": h * w / (width * height), "log aspect": np.log(w / h),
            "top": top[movable_y] / (height - h[movable_y]), "left": left[movable_x] / (width - w[movable_x])}


@pytest.mark.parametrize("width,height,scale,ratio", [
    (500, 375, (0.08, 1.0), (3 / 4, 4 / 3)),   # an ImageNet photo, the DeiT recipe
    (375, 500, (0.08, 1.0), (3 / 4, 4 / 3)),   # portrait
    (600, 90, (0.08, 1.0), (3 / 4, 4 / 3)),    # a panorama: the fallback decides a third of the time
    (64, 48, (0.35, 1.0), (0.5, 2.0)),         # other recipe parameters, a tiny image
])
def test_crops_follow_timms_random_resized_crop(width, height, scale, ratio):
    image = torch.empty(1, height, width)  # timm reads only its size
    random.seed(1)
    theirs = crops(lambda: RRC.get_params(image, scale, ratio), width, height)
    random.seed(2)  # other draws: the same distribution, not the same numbers
    sampler = RandomResizedCropParams(scale, ratio)
    ours = crops(lambda: sampler.sample(width, height), width, height)
    assert not np.array_equal(ours, theirs)
    for name, (a, b) in {k: (v, features(theirs, width, height)[k])
                         for k, v in features(ours, width, height).items()}.items():
        assert ks_2samp(a, b).pvalue > 1e-3, name
    # The centre fallback (the whole image, clamped to the aspect range) as often as timm's.
    def centre(c):
        return np.mean((c[:, 0] == (height - c[:, 2]) // 2) & (c[:, 1] == (width - c[:, 3]) // 2)
                       & ((c[:, 2] == height) | (c[:, 3] == width)))
    assert abs(centre(ours) - centre(theirs)) < 4 * np.sqrt(0.25 / DRAWS) + 1e-9
    assert np.all(ours[:, 2] <= height) and np.all(ours[:, 3] <= width) and np.all(ours[:, :2] >= 0)


def test_a_uniform_aspect_ratio_would_be_caught():
    """The test's own power: a sampler that draws the aspect ratio uniformly (not log-uniformly)
    fails the same check."""
    class Uniform(RandomResizedCropParams):
        def sample(self, width, height):
            import math
            for _ in range(10):
                area = random.uniform(*self.scale) * width * height
                aspect = random.uniform(*self.ratio)
                w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w <= width and h <= height:
                    return random.randint(0, height - h), random.randint(0, width - w), h, w
            return 0, 0, height, width
    image = torch.empty(1, 375, 500)
    random.seed(1)
    theirs = crops(lambda: RRC.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)), 500, 375)
    wrong = Uniform()
    ours = crops(lambda: wrong.sample(500, 375), 500, 375)
    assert ks_2samp(np.log(ours[:, 3] / ours[:, 2]), np.log(theirs[:, 3] / theirs[:, 2])).pvalue < 1e-3
