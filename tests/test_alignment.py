"""faceid_keras.alignment: the Umeyama transform onto insightface's template and the bilinear warp."""
import numpy as np
import pytest

from faceid_keras import alignment


def _similarity(angle: float, scale: float, shift) -> np.ndarray:
    """A 2x2 rotation-and-scale matrix and its shift, as one [2, 3] affine matrix."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _faces(count: int, seed: int = 0, size: int = 200):
    """Smooth random images with landmarks placed by a random similarity of the template, plus noise."""
    rng = np.random.default_rng(seed)
    images, landmarks = [], []
    for _ in range(count):
        noise = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.float32)
        image = np.kron(noise, np.ones((8, 8, 1)))  # blocky, so neighbours interpolate to new values
        matrix = _similarity(rng.uniform(-0.6, 0.6), rng.uniform(0.7, 1.6), rng.uniform(10, 70, 2))
        landmarks.append(_apply(matrix, alignment.ARCFACE_TEMPLATE) + rng.normal(0, 1.5, (5, 2)))
        images.append(image.astype(np.uint8))
    return np.stack(images), np.stack(landmarks)


@pytest.mark.parametrize("size, expected_first", [(112, (38.2946, 51.6963)), (224, (76.5892, 103.3926)),
                                                  (128, (46.2946, 51.6963)), (256, (92.5892, 103.3926))])
def test_template_sizes_follow_insightface(size, expected_first):
    np.testing.assert_allclose(alignment.template(size)[0], expected_first)


def test_template_rejects_other_sizes():
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        alignment.template(100)


def test_exact_similarity_maps_landmarks_onto_template():
    truth = _similarity(0.3, 1.7, (12.0, -4.0))
    landmarks = _apply(truth, alignment.ARCFACE_TEMPLATE)
    transform = alignment.estimate_transforms(landmarks)[0]
    np.testing.assert_allclose(_apply(transform, landmarks), alignment.ARCFACE_TEMPLATE, atol=1e-9)


def test_aligned_crop_puts_landmark_dots_on_the_template():
    image = np.zeros((300, 300, 3), np.uint8)
    truth = _similarity(-0.4, 2.2, (40.0, 30.0))
    landmarks = _apply(truth, alignment.ARCFACE_TEMPLATE)
    for x, y in np.round(landmarks).astype(int):
        image[y - 3:y + 4, x - 3:x + 4] = 255
    crop = alignment.align_face(image, np.round(landmarks), 112)[..., 0].astype(np.float64)
    for x, y in alignment.ARCFACE_TEMPLATE:
        window = crop[int(y) - 5:int(y) + 6, int(x) - 5:int(x) + 6]
        rows, cols = np.mgrid[int(y) - 5:int(y) + 6, int(x) - 5:int(x) + 6]
        centre = (np.sum(cols * window) / window.sum(), np.sum(rows * window) / window.sum())
        np.testing.assert_allclose(centre, (x, y), atol=0.5)


def test_warp_of_a_linear_ramp_is_exact_and_rounded_to_nearest():
    # Bilinear interpolation reproduces a linear image exactly, so each output pixel must be the ramp
    # at the mapped-back position, rounded to nearest (a truncating warp is half a level darker).
    ys, xs = np.mgrid[0:256, 0:256].astype(np.float64)
    ramp = np.stack([xs, ys, 255 - xs], axis=-1).astype(np.uint8)
    landmarks = _apply(_similarity(0.2, 1.3, (60.0, 50.0)), alignment.ARCFACE_TEMPLATE)
    crop = alignment.align_faces(ramp[None], landmarks[None])[0].astype(np.float64)
    inverse = np.linalg.inv(np.vstack([alignment.estimate_transforms(landmarks)[0], [0, 0, 1]]))[:2]
    v, u = np.mgrid[0:112, 0:112].astype(np.float64)
    source = np.stack([u, v], axis=-1) @ inverse[:, :2].T + inverse[:, 2]
    expected = np.stack([source[..., 0], source[..., 1], 255 - source[..., 0]], axis=-1)
    assert np.abs(crop - np.round(expected)).max() <= 1
    assert abs(np.mean(crop - expected)) < 0.05


def test_matches_insightface_norm_crop():
    import cv2

    skimage_transform = pytest.importorskip("skimage.transform")
    images, landmarks = _faces(6)
    for size in (112, 128):
        ours = alignment.align_faces(images, landmarks, size).astype(int)
        for image, points, crop in zip(images, landmarks, ours):
            reference = skimage_transform.SimilarityTransform.from_estimate(points, alignment.template(size))
            np.testing.assert_allclose(alignment.estimate_transforms(points, size)[0], reference.params[:2],
                                       atol=1e-9)
            expected = cv2.warpAffine(image, reference.params[:2], (size, size), borderValue=0.0).astype(int)
            np.testing.assert_array_equal(crop, expected)
    collinear = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0], [55.0, 55.0]])
    reference = skimage_transform.SimilarityTransform.from_estimate(collinear, alignment.template(112))
    np.testing.assert_allclose(alignment.estimate_transforms(collinear)[0], reference.params[:2], atol=1e-9)


def test_landmark_formats_and_errors():
    images, landmarks = _faces(2)
    flat = alignment.align_faces(images, landmarks.reshape(2, 10))
    np.testing.assert_array_equal(flat, alignment.align_faces(images, landmarks))
    assert flat.shape == (2, 112, 112, 3) and flat.dtype == np.uint8
    with pytest.raises(ValueError, match="coincide"):
        alignment.estimate_transforms(np.ones((5, 2)))
    with pytest.raises(ValueError, match="shape"):
        alignment.estimate_transforms(np.ones((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        alignment.estimate_transforms(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="2 images but 1"):
        alignment.align_faces(images, landmarks[:1])
    with pytest.raises(ValueError, match="image 0 must be uint8"):
        alignment.align_faces(images.astype(np.float32), landmarks)
    mixed = alignment.align_faces([images[0], images[1, :150]], landmarks)
    np.testing.assert_array_equal(mixed[0], flat[0])
