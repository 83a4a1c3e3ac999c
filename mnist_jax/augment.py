"""Data augmentation on the device: random affine maps and elastic distortion.

Everything here is a pure function of its arguments, so it runs inside the
compiled training epoch (``jax.jit``, ``lax.scan``, ``jax.vmap`` over a stacked
"models" axis, ``lax.map``) and is bitwise reproducible: the same key and images
give the same output on every call.

What the parameters of :class:`AugmentSpec` mean (each image draws its own values,
independently and uniformly):

- ``rotation=r``: angle in ``[-r, r]`` degrees; positive turns the digit
  counter-clockwise as displayed (row 0 at the top), like ``np.rot90``.
- ``scale=s``: zoom factor ``z`` in ``[1 - s, 1 + s]``, the same on both axes;
  ``z > 1`` enlarges the digit.
- ``shear=h``: shear angle in ``[-h, h]`` degrees; the column of a pixel moves by
  ``tan(angle)`` times its row (measured from the centre), a horizontal shear.
- ``translate=t``: shift in ``[-t, t]`` pixels, drawn separately for rows and
  columns (continuous, so fractional shifts are interpolated).
- ``elastic_alpha=a``, ``elastic_sigma=g``: Simard et al. (2003) elastic distortion:
  a displacement field of ``U(-1, 1)`` noise per pixel and axis, smoothed by a
  Gaussian of ``g`` pixels (scipy's ``gaussian_filter``, ``mode="reflect"``, as a
  separable convolution: two small matmuls) and scaled by ``a``. ``a = 0`` turns it
  off. With ``g = 4`` the smoothed field has an RMS of about ``a / 20`` pixels per
  axis on a 28x28 image, so Simard's ``a = 34`` moves pixels by ~1.7 px.

The forward map of an image is ``p_out = T (p_src - c) + c + t`` with
``T = R(rotation) @ Shear(shear) @ zoom`` and ``c`` the image centre
``((H - 1) / 2, (W - 1) / 2)``, in (row, column) pixel coordinates.  What
:func:`affine_matrices` returns and :func:`warp_affine` takes is its inverse, the
pull-back (as in ``scipy.ndimage.affine_transform``): a ``(2, 3)`` matrix ``[M | o]``
that sends an output pixel, measured from the centre, to the source point it reads,
also measured from the centre: ``p_src - c = M (p_out - c) + o``.  The elastic
displacement is added to those source points, so one bilinear resampling serves both
(the digit is blurred once).  Resampling is bilinear with zeros outside the image
(``jax.scipy.ndimage.map_coordinates``, ``order=1, mode="constant"``: the same as
scipy's ``mode="grid-constant"``); the output is clamped to the range spanned by
the image and 0, which a convex combination can only leave by rounding.

RNG: one key per batch.  Inside, ``jax.random.split(key, B)`` gives image ``i`` its
own key ``k_i``; its affine parameters are ``uniform(fold_in(k_i, 0), (5,), -1, 1)``
(rotation, zoom, shear, row shift, column shift, each times its bound; threefry) and
its elastic noise, ``U(-1, 1)`` of shape ``(2, H, W)`` (row then column displacement),
hashes the element indices with the two words of ``fold_in(k_i, 1)`` (the counter-based
hash of :mod:`mnist_jax.dropout`, several times cheaper than threefry on the CPU).  The
caller derives the batch key from the train state's rng and step, so a resumed run draws exactly the same transforms.

Reference recipes (documented, not enforced): cdeotte's Kaggle "MNIST 99.75"
uses ``rotation=10, scale=0.1, translate=2.8`` (shifts of 0.1 x 28 px; Keras draws
its zoom per axis, ours is one factor);
many single-model records use ``translate=2`` or ``3`` with a small rotation; Simard
et al. use ``elastic_alpha=34, elastic_sigma=4``.

Cost: the elastic distortion about doubles the affine warp's (its noise, two 28x28
matmuls per image and axis).  Resampling is four point gathers per pixel
(``map_coordinates``), which XLA:CPU runs faster than one gather of 2x2 windows or of
flattened indices (the figures are in the docs' Benchmarks page).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.dropout import key_words, lowbias32
from mnist_jax.errors import UsageError

__all__ = [
    "AugmentSpec",
    "affine_from_params",
    "affine_matrices",
    "augment",
    "center_zoom",
    "elastic_displacements",
    "elastic_noise",
    "gaussian_matrix",
    "warp_affine",
    "zoom_matrix",
]

_AFFINE, _ELASTIC = 0, 1  # fold_in tags of an image key's two streams
_ALIASES = {"elastic": "elastic_alpha", "zoom": "scale"}
_LIMITS = {  # field: (lowest allowed, strict upper bound or None, what it is)
    "rotation": (0.0, 180.0 + 1e-9, "degrees in [0, 180]"),
    "scale": (0.0, 1.0, "a zoom spread in [0, 1)"),
    "shear": (0.0, 90.0, "degrees in [0, 90)"),
    "translate": (0.0, None, "pixels, 0 or more"),
    "elastic_alpha": (0.0, None, "0 or more"),
    "elastic_sigma": (None, None, "pixels, more than 0"),
}


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The bounds of the random transforms (see the module doc); all zero: no augmentation.

    Frozen and hashable, so it can be a static argument of ``jax.jit``.  Invalid values
    raise :class:`~mnist_jax.errors.UsageError` at construction.
    """

    rotation: float = 0.0  # max |angle| in degrees, uniform in [-r, r]
    scale: float = 0.0  # zoom factor uniform in [1 - s, 1 + s]
    shear: float = 0.0  # max |shear angle| in degrees
    translate: float = 0.0  # max |shift| in pixels, per axis, uniform
    elastic_alpha: float = 0.0  # elastic distortion strength (0: off)
    elastic_sigma: float = 4.0  # Gaussian smoothing of the displacement field, pixels

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise UsageError(f"invalid augmentation {f.name}={value!r}: expected a number")
            value = float(value)
            lo, hi, what = _LIMITS[f.name]
            ok = math.isfinite(value) and (value >= lo if lo is not None else value > 0)
            if not ok or (hi is not None and value >= hi):
                raise UsageError(f"invalid augmentation {f.name}={value:g}: expected {what}")
            object.__setattr__(self, f.name, value)  # ints become floats: one hash per spec

    @property
    def enabled(self) -> bool:
        """Whether any transform is switched on (otherwise :func:`augment` is the identity)."""
        return any((self.rotation, self.scale, self.shear, self.translate, self.elastic_alpha))

    def to_dict(self) -> dict[str, float]:
        """All fields, for ``config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`UsageError`."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise UsageError(f"unknown augmentation setting(s) {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(names)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> AugmentSpec:
        """The command-line form: ``"rotation=10,scale=0.1,shear=5,translate=2,elastic=34"``.

        Keys are the field names (``-`` works for ``_``; ``elastic`` means
        ``elastic_alpha``, ``zoom`` means ``scale``); omitted keys keep their defaults;
        ``"none"`` is the default spec.  Bad text raises a one-line :class:`UsageError`.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        form = "expected 'none' or KEY=NUMBER,... with KEY in " + ", ".join(names)
        stripped = text.strip()
        if stripped.lower() == "none":
            return cls()
        if not stripped:
            raise UsageError(f"invalid augmentation {text!r}: {form}")
        values: dict[str, float] = {}
        for item in stripped.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower().replace("-", "_")
            key = _ALIASES.get(key, key)
            if not sep or key not in names:
                raise UsageError(f"invalid augmentation {text!r}: {item.strip()!r}: {form}")
            if key in values:
                raise UsageError(f"invalid augmentation {text!r}: {key} given twice")
            try:
                values[key] = float(value)
            except ValueError:
                raise UsageError(f"invalid augmentation {text!r}: {item.strip()!r}: "
                                 f"{value.strip()!r} is not a number") from None
        return cls(**values)

    def to_text(self) -> str:
        """The :meth:`parse` form of this spec (only the non-default fields; ``"none"``)."""
        default = AugmentSpec()
        items = [f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != getattr(default, f.name)]
        return ",".join(items) or "none"


# ---------------------------------------------------------------- the transforms


def affine_from_params(rotation, scale, shear, translate_y, translate_x) -> jax.Array:
    """Pull-back matrices ``(..., 2, 3)`` of the forward map with these parameters.

    ``rotation`` and ``shear`` in degrees, ``scale`` the zoom factor (1: none),
    translations in pixels (positive moves the digit down / right); the arguments
    broadcast against each other.  See the module doc for the conventions.
    """
    theta = jnp.deg2rad(jnp.asarray(rotation, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    tan = jnp.tan(jnp.deg2rad(jnp.asarray(shear, jnp.float32)))
    inv_zoom = 1.0 / jnp.asarray(scale, jnp.float32)
    ty = jnp.asarray(translate_y, jnp.float32)
    tx = jnp.asarray(translate_x, jnp.float32)
    # T^-1 = zoom^-1 Shear^-1 R^-1, with R = [[cos, -sin], [sin, cos]] in (row, col)
    # and Shear = [[1, 0], [tan, 1]].
    m00, m01 = inv_zoom * cos, inv_zoom * sin
    m10, m11 = inv_zoom * (-tan * cos - sin), inv_zoom * (cos - tan * sin)
    o0 = -(m00 * ty + m01 * tx)
    o1 = -(m10 * ty + m11 * tx)
    rows = [jnp.stack(jnp.broadcast_arrays(m00, m01, o0), -1),
            jnp.stack(jnp.broadcast_arrays(m10, m11, o1), -1)]
    return jnp.stack(jnp.broadcast_arrays(*rows), -2)


def _image_keys(key: jax.Array, batch: int, stream: int) -> jax.Array:
    keys = jax.random.split(key, batch)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, stream)


@functools.partial(jax.jit, static_argnums=(1, 2))
def affine_matrices(key: jax.Array, batch: int, spec: AugmentSpec) -> jax.Array:
    """The ``(batch, 2, 3)`` pull-back matrices that :func:`augment` draws from ``key``."""
    keys = _image_keys(key, batch, _AFFINE)
    u = jax.vmap(lambda k: jax.random.uniform(k, (5,), jnp.float32, -1.0, 1.0))(keys)
    return affine_from_params(spec.rotation * u[:, 0], 1.0 + spec.scale * u[:, 1],
                              spec.shear * u[:, 2], spec.translate * u[:, 3],
                              spec.translate * u[:, 4])


@functools.cache
def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``(size, size)`` float32 ``G`` with ``G @ v == scipy.ndimage.gaussian_filter1d(v,
    sigma, mode="reflect", truncate=truncate)`` for a length-``size`` vector ``v``."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    rows = np.repeat(np.arange(size), offsets.size)
    cols = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1) % (2 * size)
    cols = np.where(cols >= size, 2 * size - 1 - cols, cols)  # half-sample reflection
    g = np.zeros((size, size))
    np.add.at(g, (rows, cols), np.tile(weights, size))
    g = g.astype(np.float32)
    g.setflags(write=False)
    return g


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def elastic_noise(key: jax.Array, batch: int, height: int, width: int) -> jax.Array:
    """The raw ``U(-1, 1)`` noise ``(batch, 2, height, width)`` behind the elastic field.

    Image ``i`` hashes its element indices with the two words of ``fold_in(k_i, 1)``
    (``k_i`` from ``split(key, batch)``), using the counter-based hash of
    :mod:`mnist_jax.dropout`, several times cheaper than threefry on the CPU.  24 bits per value, so values lie on a grid of ``2**-23``.
    """
    keys = _image_keys(key, batch, _ELASTIC)
    words = jax.vmap(key_words)(keys)  # (batch, 2) uint32
    k0 = words[:, 0].reshape(batch, 1, 1, 1)
    k1 = words[:, -1].reshape(batch, 1, 1, 1)
    index = jax.lax.iota(jnp.uint32, 2 * height * width).reshape(1, 2, height, width)
    bits = lowbias32(lowbias32(index ^ k0) + k1) >> 8
    return bits.astype(jnp.float32) * (2.0 / 2**24) - 1.0


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def elastic_displacements(key: jax.Array, batch: int, height: int, width: int,
                          spec: AugmentSpec) -> jax.Array:
    """The ``(batch, 2, height, width)`` displacements (rows, then columns, in pixels)
    that :func:`augment` adds to the source points: :func:`elastic_noise` smoothed by
    the Gaussian of ``elastic_sigma`` and scaled by ``elastic_alpha`` (zeros when 0)."""
    if spec.elastic_alpha == 0.0:
        return jnp.zeros((batch, 2, height, width), jnp.float32)
    noise = elastic_noise(key, batch, height, width)
    g_rows = jnp.asarray(gaussian_matrix(height, spec.elastic_sigma))
    g_cols = jnp.asarray(gaussian_matrix(width, spec.elastic_sigma))
    # The separable Gaussian filter as two matmuls, G_rows @ noise @ G_cols^T; HIGHEST
    # keeps GPUs from rounding it through TF32 (the CPU computes float32 anyway).
    smooth = jnp.einsum("ij,bajk,lk->bail", g_rows, noise, g_cols,
                        precision=jax.lax.Precision.HIGHEST)
    return spec.elastic_alpha * smooth


def _source_points(matrices: jax.Array, height: int, width: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Absolute source (row, col) of every output pixel: two ``(B, H, W)`` arrays."""
    cy, cx = (height - 1) / 2, (width - 1) / 2
    r = (jnp.arange(height, dtype=jnp.float32) - cy)[None, :, None]
    c = (jnp.arange(width, dtype=jnp.float32) - cx)[None, None, :]
    m = matrices.astype(jnp.float32)[:, :, :, None, None]
    rows = m[:, 0, 0] * r + m[:, 0, 1] * c + m[:, 0, 2] + cy
    cols = m[:, 1, 0] * r + m[:, 1, 1] * c + m[:, 1, 2] + cx
    return rows, cols


def _resample(images: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Bilinear samples of each image at its (rows, cols), zero outside, clamped to the
    range of the image and 0."""
    def one(image, r, c):
        return jax.scipy.ndimage.map_coordinates(image, [r, c], order=1, mode="constant")

    out = jax.vmap(one)(images, rows, cols)
    lo = jnp.minimum(images.min(axis=(1, 2), keepdims=True), 0)
    hi = jnp.maximum(images.max(axis=(1, 2), keepdims=True), 0)
    return jnp.clip(out, lo, hi).astype(images.dtype)


def _check_images(images: jax.Array) -> None:
    if images.ndim != 3 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"expected float images (B, H, W), got {images.dtype} {images.shape}")


@jax.jit
def warp_affine(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Resample each image ``(B, H, W)`` through its pull-back matrix ``(B, 2, 3)``
    about the image centre: bilinear, zeros outside (see the module doc)."""
    _check_images(images)
    rows, cols = _source_points(matrices, images.shape[1], images.shape[2])
    return _resample(images, rows, cols)


@functools.cache
def zoom_matrix(size: int, zoom: float) -> np.ndarray:
    """``(size, size)`` float32 ``Z`` such that ``Z @ v`` resamples a length-``size``
    vector ``v`` zoomed by ``zoom`` about its centre: output ``i`` reads the source point
    ``c + (i - c) / zoom``, ``c = (size - 1) / 2``, linearly interpolated, zero outside.
    Bilinear resampling is separable, so ``Z @ image @ Z.T`` is :func:`warp_affine`
    with the pull-back ``[[1/zoom, 0, 0], [0, 1/zoom, 0]]``."""
    centre = (size - 1) / 2
    src = centre + (np.arange(size) - centre) / zoom
    low = np.floor(src)
    z = np.zeros((size, size))
    for weight, column in ((1 - (src - low), low), (src - low, low + 1)):
        inside = (column >= 0) & (column < size)
        np.add.at(z, (np.arange(size)[inside], column[inside].astype(int)), weight[inside])
    z = z.astype(np.float32)
    z.setflags(write=False)
    return z


def center_zoom(images: jax.Array, zoom: float) -> jax.Array:
    """``images`` ``(B, H, W[, C])`` zoomed by the fixed factor ``zoom`` about their centre
    (bilinear, zeros outside; ``zoom > 1`` enlarges the digit): two small matmuls per
    image, cheap enough to run on every batch inside the compiled epoch."""
    if zoom == 1.0:
        return images
    rows = jnp.asarray(zoom_matrix(images.shape[1], float(zoom)))
    cols = jnp.asarray(zoom_matrix(images.shape[2], float(zoom)))
    # HIGHEST keeps GPUs from rounding the interpolation through TF32.
    out = jnp.einsum("ij,bjk...,lk->bil...", rows, images, cols,
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(images.dtype)


def augment(key: jax.Array, images: jax.Array, spec: AugmentSpec) -> jax.Array:
    """One independent random transform per image of ``images`` (float ``(B, H, W)``),
    a pure function of ``key``; same shape and dtype.  Returns ``images`` itself when
    ``spec`` is not enabled.  See the module doc for the distributions and the RNG use."""
    if not spec.enabled:
        return images
    _check_images(images)
    return _augment(key, images, spec)


# Jitted, so that eager callers compile it once; inside a caller's jit it is inlined.
@functools.partial(jax.jit, static_argnums=2)
def _augment(key: jax.Array, images: jax.Array, spec: AugmentSpec) -> jax.Array:
    batch, height, width = images.shape
    rows, cols = _source_points(affine_matrices(key, batch, spec), height, width)
    if spec.elastic_alpha > 0:
        d = elastic_displacements(key, batch, height, width, spec)
        rows, cols = rows + d[:, 0], cols + d[:, 1]
    return _resample(images, rows, cols)
