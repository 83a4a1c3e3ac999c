"""Specification of mnist_jax.augment: the spec, the affine warp, elastic noise, the RNG use."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mnist_jax.augment import (
    AugmentSpec,
    affine_from_params,
    affine_matrices,
    augment,
    center_zoom,
    elastic_displacements,
    elastic_noise,
    gaussian_matrix,
    warp_affine,
    zoom_matrix,
)
from mnist_jax.errors import UsageError

FULL = AugmentSpec(rotation=10, scale=0.1, shear=5, translate=2, elastic_alpha=34)
AFFINE = AugmentSpec(rotation=10, scale=0.1, shear=5, translate=2)


def _images(batch: int = 8, size: tuple[int, int] = (28, 28), seed: int = 0) -> np.ndarray:
    """Random float32 images in [0, 1] with exact zeros and ones among them."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *size), dtype=np.float32)
    x[:, ::5] = 0.0
    x[:, :, ::7] = 1.0
    return x


def _key(seed: int = 0) -> jax.Array:
    return jax.random.PRNGKey(seed)  # raw uint32[2], like the train state's rng


def _zero_filled_roll(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.roll(image, (dy, dx), axis=(-2, -1))
    if dy > 0:
        out[..., :dy, :] = 0
    elif dy < 0:
        out[..., dy:, :] = 0
    if dx > 0:
        out[..., :, :dx] = 0
    elif dx < 0:
        out[..., :, dx:] = 0
    return out


# ---------------------------------------------------------------- AugmentSpec


def test_default_spec_is_disabled_and_any_bound_enables_it():
    assert not AugmentSpec().enabled
    assert not AugmentSpec(elastic_sigma=2.0).enabled  # sigma alone moves nothing
    for field in ("rotation", "scale", "shear", "translate", "elastic_alpha"):
        assert AugmentSpec(**{field: 0.05}).enabled, field


def test_spec_is_hashable_and_ints_equal_floats():
    assert hash(AugmentSpec(rotation=10)) == hash(AugmentSpec(rotation=10.0))
    assert AugmentSpec(rotation=10) == AugmentSpec(rotation=10.0)
    assert isinstance(AugmentSpec(rotation=10).rotation, float)
    assert len({AugmentSpec(), AugmentSpec(translate=2), AugmentSpec(translate=2.0)}) == 2


def test_parse_reads_the_cli_form_and_to_text_round_trips():
    spec = AugmentSpec.parse("rotation=10, scale=0.1,shear=5,translate=2,elastic=34,"
                             "elastic-sigma=5")
    assert spec == AugmentSpec(rotation=10, scale=0.1, shear=5, translate=2,
                               elastic_alpha=34, elastic_sigma=5)
    assert AugmentSpec.parse(spec.to_text()) == spec
    assert AugmentSpec.parse("zoom=0.2") == AugmentSpec(scale=0.2)
    assert AugmentSpec.parse("translate=3").to_text() == "translate=3"
    assert AugmentSpec.parse("none") == AugmentSpec.parse(" None ") == AugmentSpec()
    assert AugmentSpec().to_text() == "none"


@pytest.mark.parametrize("text", [
    "", "rotation", "rotation=", "rotation=ten", "spin=3", "rotation=1,rotation=2",
    "scale=1", "scale=-0.1", "shear=90", "rotation=200", "translate=inf", "translate=nan",
    "elastic_sigma=0", "elastic=-1", "rotation=10;scale=0.1",
])
def test_parse_rejects_bad_text_with_one_line(text):
    with pytest.raises(UsageError) as info:
        AugmentSpec.parse(text)
    assert "\n" not in str(info.value)
    assert "augmentation" in str(info.value)


def test_dict_round_trip_and_bad_dicts():
    spec = FULL
    assert AugmentSpec.from_dict(spec.to_dict()) == spec
    assert set(spec.to_dict()) == {"rotation", "scale", "shear", "translate",
                                   "elastic_alpha", "elastic_sigma"}
    with pytest.raises(UsageError, match="unknown augmentation setting"):
        AugmentSpec.from_dict({"rotation": 1, "flip": 1})
    with pytest.raises(UsageError, match="expected a number"):
        AugmentSpec.from_dict({"rotation": "10"})
    with pytest.raises(UsageError, match="expected a number"):
        AugmentSpec(translate=True)


# ---------------------------------------------------------------- warp_affine


def test_identity_matrices_return_the_input_exactly():
    x = _images()
    eye = jnp.broadcast_to(jnp.eye(2, 3), (x.shape[0], 2, 3))
    np.testing.assert_array_equal(np.asarray(warp_affine(jnp.asarray(x), eye)), x)
    np.testing.assert_array_equal(
        np.asarray(warp_affine(jnp.asarray(x), affine_from_params(0, 1, 0, 0, 0)[None]
                               .repeat(x.shape[0], 0))), x)


def test_positive_rotation_turns_counter_clockwise_like_rot90():
    x = _images(4)
    quarter = jnp.asarray([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # the exact +90 degree pull-back
    out = warp_affine(jnp.asarray(x), jnp.broadcast_to(quarter, (4, 2, 3)))
    np.testing.assert_array_equal(np.asarray(out), np.rot90(x, 1, axes=(1, 2)))
    for degrees, k in ((90, 1), (-90, -1), (180, 2)):
        m = jnp.broadcast_to(affine_from_params(degrees, 1.0, 0.0, 0.0, 0.0), (4, 2, 3))
        # cos(pi / 2) is not exactly 0 in float32: equal up to that rounding.
        np.testing.assert_allclose(np.asarray(warp_affine(jnp.asarray(x), m)),
                                   np.rot90(x, k, axes=(1, 2)), atol=1e-5)


def test_rotation_of_a_non_square_image_is_about_its_centre():
    x = _images(1, (20, 32))
    out = np.asarray(warp_affine(jnp.asarray(x), affine_from_params(180, 1, 0, 0, 0)[None]))
    np.testing.assert_allclose(out, x[:, ::-1, ::-1], atol=1e-5)


@pytest.mark.parametrize("dy,dx", [(0, 3), (2, 0), (-3, 1), (4, -2), (-1, -1)])
def test_integer_translation_is_a_zero_filled_roll(dy, dx):
    x = _images(3)
    m = jnp.broadcast_to(affine_from_params(0, 1, 0, dy, dx), (3, 2, 3))
    np.testing.assert_array_equal(np.asarray(warp_affine(jnp.asarray(x), m)),
                                  _zero_filled_roll(x, dy, dx))


def test_warp_matches_scipy_affine_transform_bilinear_zero_outside():
    x = _images(6)
    spec = AugmentSpec(rotation=30, scale=0.3, shear=20, translate=5)
    mats = np.asarray(affine_matrices(_key(3), 6, spec), np.float64)
    out = np.asarray(warp_affine(jnp.asarray(x), jnp.asarray(mats, jnp.float32)))
    centre = np.array([13.5, 13.5])
    for i in range(6):
        m, o = mats[i, :, :2], mats[i, :, 2]
        want = ndimage.affine_transform(x[i].astype(np.float64), m, offset=o + centre - m @ centre,
                                        order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(out[i], want, atol=2e-5)


def test_zoom_above_one_enlarges_the_digit():
    x = np.zeros((1, 28, 28), np.float32)
    x[0, 10:18, 10:18] = 1.0  # an 8x8 square about the centre
    big = np.asarray(warp_affine(jnp.asarray(x), affine_from_params(0, 1.5, 0, 0, 0)[None]))
    small = np.asarray(warp_affine(jnp.asarray(x), affine_from_params(0, 0.5, 0, 0, 0)[None]))
    assert big.sum() == pytest.approx(64 * 1.5**2, rel=0.05)
    assert small.sum() == pytest.approx(64 * 0.5**2, rel=0.05)


@pytest.mark.parametrize("zoom", [1.12, 0.8])
def test_center_zoom_is_warp_affine_of_a_fixed_zoom(zoom):
    x = _images(4, (28, 26))
    want = warp_affine(jnp.asarray(x), affine_from_params(0, zoom, 0, 0, 0)[None].repeat(4, 0))
    np.testing.assert_allclose(center_zoom(jnp.asarray(x), zoom), want, atol=5e-6)
    channels = center_zoom(jnp.asarray(x)[..., None], zoom)
    np.testing.assert_allclose(channels[..., 0], want, atol=5e-6)


def test_center_zoom_of_one_is_the_identity_and_rows_of_a_zoom_in_sum_to_one():
    x = jnp.asarray(_images(2))
    assert center_zoom(x, 1.0) is x
    np.testing.assert_allclose(zoom_matrix(28, 1.12).sum(axis=1), 1.0, rtol=1e-6)
    assert zoom_matrix(28, 0.8).sum(axis=1).min() == 0.0  # zoomed out: zeros at the border


def test_shear_moves_columns_in_proportion_to_the_row():
    x = np.zeros((1, 28, 28), np.float32)
    x[0, :, 14] = 1.0  # a vertical line
    out = np.asarray(warp_affine(jnp.asarray(x), affine_from_params(0, 1, 45, 0, 0)[None]))
    # tan(45 deg) = 1: the pixel at row r (from the centre 13.5) moves by r columns.
    for row in (4, 10, 20):
        centroid = (out[0, row] * np.arange(28)).sum() / out[0, row].sum()
        assert centroid == pytest.approx(14 + (row - 13.5), abs=1e-3)


# ---------------------------------------------------------------- augment


def test_disabled_spec_returns_the_images_themselves():
    x = jnp.asarray(_images())
    assert augment(_key(), x, AugmentSpec()) is x
    assert augment(_key(), x, AugmentSpec(elastic_sigma=3)) is x


@pytest.mark.parametrize("spec", [AFFINE, FULL, AugmentSpec(elastic_alpha=34)])
def test_augment_keeps_shape_dtype_and_the_unit_range(spec):
    x = _images(64)
    x[:8] = 1.0  # all-white images: where rounding could overshoot 1
    out = np.asarray(augment(_key(), jnp.asarray(x), spec))
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, x)


def test_same_key_is_bitwise_reproducible_and_other_keys_differ():
    x = jnp.asarray(_images(16))
    a = np.asarray(augment(_key(1), x, FULL))
    np.testing.assert_array_equal(a, np.asarray(augment(_key(1), x, FULL)))
    assert not np.array_equal(a, np.asarray(augment(_key(2), x, FULL)))
    fn = jax.jit(augment, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(fn(_key(1), x, FULL)),
                                  np.asarray(fn(_key(1), x, FULL)))
    np.testing.assert_array_equal(np.asarray(fn(_key(1), x, FULL)), a)


def test_typed_keys_give_the_same_transforms_as_raw_keys():
    x = jnp.asarray(_images(4))
    np.testing.assert_array_equal(np.asarray(augment(jax.random.wrap_key_data(_key(5)), x, FULL)),
                                  np.asarray(augment(_key(5), x, FULL)))


def test_every_image_gets_its_own_transform():
    x = jnp.asarray(np.repeat(_images(1), 32, axis=0))
    out = np.asarray(augment(_key(), x, FULL)).reshape(32, -1)
    distinct = {row.tobytes() for row in out}
    assert len(distinct) == 32
    mats = np.asarray(affine_matrices(_key(), 32, AFFINE))
    assert len({m.tobytes() for m in mats}) == 32


def test_an_image_transform_depends_on_its_position_not_on_the_batch_contents():
    x = _images(8)
    y = x.copy()
    y[1:] = _images(7, seed=9)
    a = np.asarray(augment(_key(), jnp.asarray(x), FULL))
    b = np.asarray(augment(_key(), jnp.asarray(y), FULL))
    np.testing.assert_array_equal(a[0], b[0])


def test_without_elastic_augment_is_warp_affine_of_the_drawn_matrices():
    x = jnp.asarray(_images(8))
    want = warp_affine(x, affine_matrices(_key(4), 8, AFFINE))
    np.testing.assert_array_equal(np.asarray(augment(_key(4), x, AFFINE)), np.asarray(want))
    with_elastic = AugmentSpec(**{**AFFINE.to_dict(), "elastic_alpha": 8.0})
    assert not np.array_equal(np.asarray(augment(_key(4), x, with_elastic)), np.asarray(want))


# ---------------------------------------------------------------- inside compiled programs


def test_under_lax_scan_each_step_draws_from_its_own_folded_key():
    x = jnp.asarray(_images(8))
    fn = functools.partial(augment, spec=FULL)

    @jax.jit
    def scanned(key, images):
        def body(carry, step):
            out = fn(jax.random.fold_in(key, step), images)
            return carry + out.sum(), out
        return jax.lax.scan(body, 0.0, jnp.arange(3))

    _, outs = scanned(_key(), x)
    one = jax.jit(fn)  # bitwise the same as inside the scan
    for step in range(3):
        np.testing.assert_array_equal(np.asarray(outs[step]),
                                      np.asarray(one(jax.random.fold_in(_key(), step), x)))
    assert not np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


def test_vmap_and_lax_map_over_a_models_axis_match_one_model_at_a_time():
    models = 3
    keys = jnp.stack([_key(s) for s in range(models)])  # (models, 2), like stacked states
    x = jnp.asarray(np.stack([_images(8, seed=s) for s in range(models)]))
    fn = functools.partial(augment, spec=FULL)
    vmapped = np.asarray(jax.jit(jax.vmap(fn))(keys, x))
    mapped = np.asarray(jax.jit(lambda k, im: jax.lax.map(lambda a: fn(*a), (k, im)))(keys, x))
    for m in range(models):
        single = np.asarray(jax.jit(fn)(keys[m], x[m]))
        np.testing.assert_array_equal(vmapped[m], single)  # bitwise: seeds stay independent
        np.testing.assert_array_equal(mapped[m], single)
    assert not np.array_equal(vmapped[0], vmapped[1])


def test_spec_works_as_a_static_jit_argument():
    x = jnp.asarray(_images(4))
    fn = jax.jit(augment, static_argnames="spec")
    a = fn(_key(), x, spec=AFFINE)
    b = fn(_key(), x, spec=AugmentSpec(rotation=10.0, scale=0.1, shear=5.0, translate=2.0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- the random draws


def _decompose(mats: np.ndarray):
    """Rotation (deg), zoom and shift of pull-back matrices drawn with shear 0."""
    m, o = mats[:, :, :2].astype(np.float64), mats[:, :, 2].astype(np.float64)
    angle = np.rad2deg(np.arctan2(m[:, 0, 1], m[:, 0, 0]))
    zoom = 1.0 / np.hypot(m[:, 0, 0], m[:, 0, 1])
    shift = -np.einsum("bij,bj->bi", np.linalg.inv(m), o)
    return angle, zoom, shift


def test_drawn_angles_zooms_and_shifts_lie_within_the_bounds_and_fill_them():
    spec = AugmentSpec(rotation=10, scale=0.1, translate=3)
    angle, zoom, shift = _decompose(np.asarray(affine_matrices(_key(7), 4096, spec)))
    for values, lo, hi in ((angle, -10, 10), (zoom, 0.9, 1.1), (shift, -3, 3)):
        assert values.min() >= lo - 1e-4 and values.max() <= hi + 1e-4
        span = hi - lo
        assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span
        assert abs(values.mean() - (lo + hi) / 2) < 0.03 * span  # uniform: centred
    # Rows and columns shift independently.
    assert abs(np.corrcoef(shift[:, 0], shift[:, 1])[0, 1]) < 0.05


def test_drawn_shears_lie_within_the_bound():
    mats = np.asarray(affine_matrices(_key(8), 4096, AugmentSpec(shear=15)), np.float64)
    # With no rotation or zoom the pull-back is [[1, 0], [-tan(shear), 1]].
    np.testing.assert_allclose(mats[:, 0, :], np.tile([1.0, 0.0, 0.0], (4096, 1)), atol=1e-6)
    shear = np.rad2deg(np.arctan(-mats[:, 1, 0]))
    assert shear.min() >= -15 - 1e-4 and shear.max() <= 15 + 1e-4
    assert shear.min() < -14.7 and shear.max() > 14.7


def test_zero_bounds_draw_identity_matrices():
    mats = np.asarray(affine_matrices(_key(), 16, AugmentSpec(elastic_alpha=1.0)))
    np.testing.assert_array_equal(mats, np.tile(np.eye(2, 3, dtype=np.float32), (16, 1, 1)))


# ---------------------------------------------------------------- elastic distortion


@pytest.mark.parametrize("size,sigma", [(28, 4.0), (28, 1.5), (20, 6.0), (9, 4.0)])
def test_gaussian_matrix_is_scipys_reflecting_gaussian_filter(size, sigma):
    g = gaussian_matrix(size, sigma)
    want = ndimage.gaussian_filter1d(np.eye(size), sigma, axis=0, mode="reflect")
    np.testing.assert_allclose(g, want, atol=1e-6)
    assert not g.flags.writeable


def test_elastic_noise_is_uniform_on_minus_one_to_one():
    noise = np.asarray(elastic_noise(_key(), 64, 28, 28))
    assert noise.shape == (64, 2, 28, 28)
    assert noise.min() >= -1.0 and noise.max() < 1.0
    assert abs(noise.mean()) < 0.01 and noise.var() == pytest.approx(1 / 3, rel=0.02)
    assert abs(np.corrcoef(noise[:, 0].ravel(), noise[:, 1].ravel())[0, 1]) < 0.02
    assert not np.array_equal(noise[0], noise[1])


def test_elastic_field_is_the_gaussian_filtered_noise_times_alpha():
    spec = AugmentSpec(elastic_alpha=34, elastic_sigma=4)
    field = np.asarray(elastic_displacements(_key(2), 4, 28, 28, spec))
    noise = np.asarray(elastic_noise(_key(2), 4, 28, 28), np.float64)
    for i in range(4):
        for axis in range(2):
            want = 34 * ndimage.gaussian_filter(noise[i, axis], 4, mode="reflect")
            np.testing.assert_allclose(field[i, axis], want, atol=1e-4)


def test_elastic_field_is_smooth():
    field = np.asarray(elastic_displacements(_key(), 256, 28, 28, AugmentSpec(elastic_alpha=34)))
    steps = np.abs(np.diff(field, axis=-1)).mean()
    # sigma 4: neighbours correlate by exp(-1/64), so steps are ~0.18 of the values.
    assert steps < 0.25 * np.abs(field).mean()  # neighbours move together
    raw = np.asarray(elastic_noise(_key(), 256, 28, 28))
    assert np.abs(np.diff(raw, axis=-1)).mean() > 0.9 * np.abs(raw).mean()  # noise does not


def test_elastic_alpha_zero_is_off_and_its_field_is_zero():
    spec = AugmentSpec(elastic_alpha=0.0, elastic_sigma=4.0)
    np.testing.assert_array_equal(np.asarray(elastic_displacements(_key(), 2, 28, 28, spec)), 0.0)
    x = jnp.asarray(_images(4))
    distorted = np.asarray(augment(_key(), x, AugmentSpec(elastic_alpha=10.0)))
    assert not np.array_equal(distorted, np.asarray(x))
    # Pixels move by a fraction of a digit stroke, not across the image.
    assert np.abs(distorted - np.asarray(x)).mean() < 0.5
