"""The Keras claims of docs/migration.md, checked against Keras itself (the page does not
import Keras; its snippets write Keras' formula with torch ops)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from maxnorm_optim import max_norm_


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras is loaded with another backend")
    return keras


def constrain(keras, constraint, kernel: torch.Tensor) -> torch.Tensor:
    out = constraint(keras.ops.convert_to_tensor(kernel.numpy()))
    return torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(out)))


def test_kernel_layouts(keras):
    """Keras keeps the output dim last; PyTorch first (an Embedding is the same in both)."""
    dense = keras.layers.Dense(5)
    dense.build((None, 3))
    assert tuple(dense.kernel.shape) == (3, 5)
    assert tuple(nn.Linear(3, 5).weight.shape) == (5, 3)
    conv = keras.layers.Conv2D(8, 3)
    conv.build((None, 6, 6, 4))
    assert tuple(conv.kernel.shape) == (3, 3, 4, 8)
    assert tuple(nn.Conv2d(4, 8, 3).weight.shape) == (8, 4, 3, 3)
    emb = keras.layers.Embedding(10, 4)
    emb.build((None,))
    assert tuple(emb.embeddings.shape) == tuple(nn.Embedding(10, 4).weight.shape) == (10, 4)


@pytest.mark.parametrize(
    "kernel_shape,axis,to_torch",
    [
        ((6, 4), 0, (1, 0)),  # Dense: (in, out) -> Linear (out, in)
        ((3, 3, 4, 8), [0, 1, 2], (3, 2, 0, 1)),  # Conv2D: (kh, kw, in, out) -> (out, in, kh, kw)
        ((5, 2, 6), [0, 1], (2, 1, 0)),  # Conv1D: (k, in, out) -> (out, in, k)
    ],
    ids=["Dense", "Conv2D", "Conv1D"],
)
def test_keras_max_norm_is_per_unit(keras, kernel_shape, axis, to_torch):
    torch.manual_seed(0)
    kernel = torch.randn(kernel_shape) * 2  # every unit above the bound
    expected = constrain(keras, keras.constraints.MaxNorm(1.0, axis=axis), kernel)
    weight = kernel.permute(to_torch).contiguous()
    norms = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
    assert bool((norms > 1.0).all())
    max_norm_(weight, 1.0)  # norm_dim="per_unit"
    # Keras divides by (norm + 1e-7): undo that, the rest is the same projection.
    keras_undone = expected.permute(to_torch) * ((norms + 1e-7) / norms)
    torch.testing.assert_close(weight, keras_undone, rtol=1e-5, atol=1e-7)


def test_a_literal_copy_of_axis_0_is_wrong(keras):
    kernel = torch.tensor([[3.0, 0.0], [0.0, 0.6], [4.0, 0.8]])  # Dense kernel (in=3, out=2)
    expected = constrain(keras, keras.constraints.MaxNorm(2.0, axis=0), kernel).T
    right, wrong = kernel.T.contiguous(), kernel.T.contiguous()
    max_norm_(right, 2.0)
    max_norm_(wrong, 2.0, norm_dim=0)
    torch.testing.assert_close(right, expected, rtol=1e-5, atol=1e-6)
    assert (wrong - expected).abs().max() > 0.1
    torch.testing.assert_close(wrong.norm(dim=1), torch.tensor([2.8011, 0.7168]), atol=1e-4, rtol=0)


def test_keras_constrains_after_each_update_not_the_initial_weights(keras):
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(5, kernel_constraint=keras.constraints.MaxNorm(0.01))
    model = keras.Sequential([keras.Input((3,)), layer])
    initial = np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel), axis=0)
    assert initial.max() > 0.01  # not constrained when built
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.fit(x, x[:, :1].repeat(5, 1), epochs=1, batch_size=8, verbose=0)
    after = np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel), axis=0)
    assert after.max() <= 0.01 * (1 + 1e-6)  # constrained after the update
