from __future__ import annotations

import numpy as np
import pytest
import torch

from nets.cnn3d import CNN3D, min_spatial_size
from nets.keras_weights import load_keras_weights


def trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_reference_weights_reproduce_reference_logits(reference_dir):
    path = reference_dir / "reference_3dcnn_seed0.npz"
    ref = np.load(path)
    net = load_keras_weights(CNN3D(), path).eval()
    x = torch.from_numpy(ref["input_bhwdc"]).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        logits = net(x).squeeze(1).numpy()
    np.testing.assert_allclose(logits, ref["expected_logit"], atol=1e-3)
    np.testing.assert_allclose(
        torch.sigmoid(torch.from_numpy(logits)).numpy(), ref["expected_probability"], atol=1e-4
    )
    assert trainable(net) == int(ref["trainable_params"])
    total = trainable(net) + sum(b.numel() for n, b in net.named_buffers() if "running" in n)
    assert total == int(ref["total_params"])


def test_spec_parameter_counts():
    net = CNN3D()
    assert trainable(net) == 1_351_873
    per_layer = [sum(p.numel() for p in block.conv.parameters()) for block in net.features]
    assert per_layer == [1_792, 110_656, 221_312, 884_992]
    assert [sum(p.numel() for p in b.bn.parameters()) for b in net.features] == [128, 128, 256, 512]
    bn = net.features[0].bn
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param((128, 128, 64), id="reference"),
        pytest.param((96, 96, 48), id="96x96x48"),
        pytest.param((46, 46, 46), id="minimum"),
    ],
)
def test_one_logit_per_scan(size):
    net = CNN3D(filters=(4, 4, 8, 8), dense_units=16).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 1)


def test_pool_before_relu_equals_reference_order():
    torch.manual_seed(0)
    net = CNN3D(filters=(4, 4, 8, 8), dense_units=16).eval()
    x = torch.rand(1, 1, 50, 50, 50)
    block = net.features[0]
    ours = block(x)
    reference = block.bn(block.pool(torch.relu(block.conv(x))))
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize(
    "size", [pytest.param((45, 64, 64), id="x45"), pytest.param((64, 64, 20), id="z20")]
)
def test_too_small_input_gets_clear_error(size):
    net = CNN3D(filters=(4, 4, 8, 8), dense_units=16)
    with pytest.raises(ValueError, match="at least 46 voxels"):
        net(torch.rand(1, 1, *size))
    assert min_spatial_size() == 46
